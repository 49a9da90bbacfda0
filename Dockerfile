# CUDA runtime image serving the OpenAI-compatible API on port 8000.
#   docker build -t branchwise . && docker run --gpus all -p 8000:8000 branchwise [MODEL] [--flags]
FROM pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime
WORKDIR /app
COPY pyproject.toml README.md ./
COPY branchwise ./branchwise
COPY configs ./configs
# torch (with triton) comes from the base image; pip keeps it since it satisfies torch>=2.4
RUN pip install --no-cache-dir .
EXPOSE 8000
ENTRYPOINT ["branchwise", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD []
