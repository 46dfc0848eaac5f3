"""fleetticketsd: keeps PostgreSQL in step with the field-ops ticket change streams in S3."""

__version__ = "0.1.0"
