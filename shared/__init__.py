"""What every neurons service uses: envelope, bus, schemas, archive, tracing, settings."""
