"""netvlad: image retrieval and visual place recognition with NetVLAD.

    >>> import netvlad
    >>> model = netvlad.load_model("default")          # or a model file
    >>> descriptors = model.describe(["a.jpg", "b.jpg"])  # (2, model.dim) float32, unit norm
    >>> index = netvlad.Index.open("my-index")           # made by `netvlad index PHOTOS --index my-index`
    >>> result = index.search(["q1.jpg", "q2.jpg"], k=5)  # several photos of one place, fused
    >>> result.hits[0].path, result.hits[0].score       # best first: id, score, path, lat, lon
    >>> result.location                                 # soft-median position of the top hits, or None

`index.search` returns one `netvlad.search.SearchResult` for all its query photos. Design notes
(the mathematics, input modes, file formats): docs/design.md.
"""

from netvlad.errors import DatasetError, ImageError, IndexStoreError, ModelFileError, NetVLADError
from netvlad.imageio import load_image
from netvlad.index import Index
from netvlad.initialization import init_model
from netvlad.model import ModelConfig, NetVLADModel, build_model
from netvlad.modelfile import load_model, model_fingerprint, save_model
from netvlad.pooling import NetVLAD
from netvlad.published import import_checkpoint
from netvlad.whitening import PCAWhitening

__version__ = "0.1.0"

__all__ = [
    "DatasetError", "ImageError", "Index", "IndexStoreError", "ModelFileError", "NetVLADError",
    "ModelConfig", "NetVLAD", "NetVLADModel", "PCAWhitening",
    "build_model", "import_checkpoint", "init_model", "load_image", "load_model", "model_fingerprint", "save_model",
]
