from services.registry.app import service

service.main()
