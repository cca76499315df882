"""Test model: answers any request with a JSON report of the stub's interpreter and imported packages."""

import json
import sys

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

import cartridges


class TritonPythonModel:
    def execute(self, requests: list) -> list:
        report = {
            "python": sys.version,
            "numpy": np.__version__,
            "torch": torch.__version__,
            "cartridges": cartridges.__version__,
            "cartridges_file": cartridges.__file__,
        }
        output = pb_utils.Tensor("text_output", np.array([json.dumps(report).encode()], dtype=np.object_))
        return [pb_utils.InferenceResponse([output]) for _ in requests]
