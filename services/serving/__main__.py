from services.serving.app import service

service.main()
