"""The path of one file: S3 → parse → COPY → commit → archive, and a dataset's drain."""
