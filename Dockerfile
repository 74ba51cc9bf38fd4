# ft on a CUDA PyTorch image. Build and run on a GPU node:
#   docker build -t ft .
#   docker run --gpus all --ipc=host -v /models:/models -v /data:/data -v $PWD/runs:/ft/runs \
#     ft configs/my_run.yaml
# (--ipc=host: DataLoader workers and NCCL need more shared memory than Docker's default.)
# `docker stop` sends SIGTERM to launch.sh, which has the workers finish their step,
# checkpoint and exit 0: give them the time a step and a save take (docker stop -t 300).
# Any CUDA build of torch >= 2.11 works: pick the tag that matches your drivers.
ARG BASE_IMAGE=pytorch/pytorch:2.11.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

WORKDIR /ft
COPY setup.cfg pyproject.toml README.md ./
COPY ft ./ft
# torch and its matching torchvision come with the base image (the pytorch/pytorch
# images ship both); pip keeps them because they satisfy torch>=2.11, torchvision>=0.26.
# PyAV's wheel brings its own FFmpeg: no system packages needed for video.
RUN pip install --no-cache-dir -e . && pip install --no-cache-dir --no-deps dashscope==2.0.2
COPY launch.sh ./
COPY configs ./configs
COPY data ./data

ENV HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ENTRYPOINT ["./launch.sh"]
