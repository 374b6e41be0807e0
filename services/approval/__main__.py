from services.approval.app import service

service.main()
