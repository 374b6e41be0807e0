from services.trainer.app import service

service.main()
