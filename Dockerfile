# rayquant on the official Ray image (Python 3.11, the Ray version the project pins).
#   GPU (default):  docker build -t REGISTRY/rayquant:0.1.0 .
#   CPU demo:       docker build -t REGISTRY/rayquant:0.1.0-cpu --build-arg BASE=rayproject/ray:2.60.0-py311-cpu \
#                     --build-arg TORCH_INDEX_URL=<the PyTorch CPU wheel index> .
ARG BASE=rayproject/ray:2.60.0-py311-gpu
FROM ${BASE}

ARG TORCH_INDEX_URL=""
WORKDIR /home/ray/rayquant
# torch first, pinned: the default PyPI wheel for Linux x86-64 is the CUDA build; a CPU image passes the
# CPU wheel index so that no CUDA libraries are pulled in.
RUN pip install --no-cache-dir ${TORCH_INDEX_URL:+--index-url ${TORCH_INDEX_URL}} torch==2.13.0
COPY --chown=ray:users . /home/ray/rayquant
RUN pip install --no-cache-dir -c constraints.txt -e . \
 && pip install --no-cache-dir --no-deps -r requirements-assets.txt \
 && python -c "import protos"  # generates the gRPC stubs into the image
