FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md celeryconfig.py ./
COPY migrator ./migrator
COPY workers ./workers
RUN pip install --no-cache-dir -e .
ENV PYTHONUNBUFFERED=1 MIGRATOR_LOG_JSON=1
CMD ["migrator", "--help"]
