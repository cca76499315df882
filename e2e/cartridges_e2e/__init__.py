"""The cluster-in-a-box test harness: real MinIO, Triton, Kubernetes control plane and a node that runs pods."""
