# ppo-feedback on a CUDA machine: docker build -t ppo-feedback . && docker run --gpus all -p 7860:7860 ppo-feedback
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04
ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-pip curl \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY requirements.txt .
RUN pip3 install -r requirements.txt
COPY . .
EXPOSE 7860
CMD ["python3", "app.py", "--host", "0.0.0.0", "--port", "7860"]
