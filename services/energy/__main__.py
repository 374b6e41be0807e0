from services.energy.app import service

service.main()
