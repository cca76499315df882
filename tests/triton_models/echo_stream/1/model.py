"""Test model (decoupled): one response per upper-cased word of ``text_input``, then a final flag."""

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests: list) -> None:
        for request in requests:
            sender = request.get_response_sender()
            text = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy()
            for word in b" ".join(text.reshape(-1)).split():
                output = pb_utils.Tensor("text_output", np.array([word.upper()], dtype=np.object_))
                sender.send(pb_utils.InferenceResponse([output]))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
