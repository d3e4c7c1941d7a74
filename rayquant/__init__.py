"""The product's shared entry points: the `rayquant` CLI and the connection to a Ray cluster, used by
both the quantization pipeline (cluster/) and the server (serving/)."""
