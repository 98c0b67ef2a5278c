# MagNet-HD for GPU clusters: CUDA runtime + compiler (DeepSpeed JIT-builds fused ops with nvcc),
# Python 3.11, the pinned dependencies from requirements.lock, the project; `deepspeed` is the entry point.
#   docker build -t magnet-hd .
#   docker run --gpus all --ipc=host -v $PWD/data:/data magnet-hd \
#       --num_gpus 8 launch/train.py --config configs/train/magnet_16um.yaml
FROM nvidia/cuda:13.0.1-cudnn-devel-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common git numactl pdsh openssh-client \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev \
 && rm -rf /var/lib/apt/lists/*

RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /opt/magnet-hd
COPY requirements.lock pyproject.toml README.md ./
RUN pip install --upgrade pip && pip install -r requirements.lock
COPY magnet magnet
COPY sharding sharding
COPY launch launch
COPY configs configs
RUN pip install --no-deps --no-build-isolation -e .

ENTRYPOINT ["deepspeed"]
CMD ["--help"]
