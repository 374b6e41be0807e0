from services.validator.app import service

service.main()
