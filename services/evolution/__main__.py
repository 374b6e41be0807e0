from services.evolution.app import service

service.main()
