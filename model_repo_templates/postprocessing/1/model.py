"""postprocessing: passes the engine's response fields through as the ensemble's outputs.

The engine model already produced the text deltas (it owns the incremental detokenizer, so stop strings
are matched across token boundaries and no space or multi-byte character is lost); this step is where any
final formatting of text_output would go. Optional fields are passed only when the engine sent them.
"""
import json

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.names = [o["name"] for o in config["output"]]

    def execute(self, requests):
        responses = []
        for request in requests:
            tensors = []
            for name in self.names:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    tensors.append(pb_utils.Tensor(name, tensor.as_numpy()))
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
