"""SHA-256 of a model directory's weights (every tensor, by name): the GPU run checks that the target it
rebuilt there from the GGUF is, weight for weight, the one this project trains against."""

import hashlib
import sys
from pathlib import Path

from safetensors.torch import load_file


def weights_digest(model_dir: str) -> str:
    digest = hashlib.sha256()
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        tensors = load_file(path)
        for name in sorted(tensors):
            digest.update(name.encode())
            digest.update(tensors[name].float().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


if __name__ == "__main__":
    print(weights_digest(sys.argv[1]))
