# polyscale on a CUDA PyTorch image (docs/reproduce.md, "Docker").
#
#   docker build -t polyscale .
#   docker run --gpus all --ipc=host -v /data:/data -v $PWD/outputs:/workspace/outputs polyscale \
#     torchrun --nproc_per_node=8 train.py experiment=psconv_t1_ps_resnet50 data.root=/data/imagenet
#
# torch and torchvision come from the base image (CUDA runtime + cuDNN); requirements.txt pins them
# for PyPI installs, so they are filtered out here rather than replaced by a second copy. Choose another
# torch with --build-arg BASE_IMAGE=pytorch/pytorch:<version>-cuda<x.y>-cudnn9-runtime.
ARG BASE_IMAGE=pytorch/pytorch:2.9.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ARG GIT_COMMIT=unknown
LABEL org.opencontainers.image.title="polyscale" \
      org.opencontainers.image.revision="${GIT_COMMIT}"
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    POLYSCALE_GIT_COMMIT=${GIT_COMMIT}

WORKDIR /workspace

# Dependencies first, so editing the sources does not reinstall them.
COPY requirements.txt ./
RUN grep -v -E '^(torch|torchvision)([=<>~! ]|$)|^-e ' requirements.txt > /tmp/requirements-image.txt \
 && pip install -r /tmp/requirements-image.txt \
 && python -c "import torch, torchvision, timm, hydra; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# The project, installed in editable mode: train.py, evaluate.py and configs/ are used from /workspace.
COPY . .
RUN pip install --no-deps -e . && python -c "import polyscale"

CMD ["python", "train.py", "--help"]
