"""Every setting of the engine and its front ends, in one place.

Each setting has a default here and can be overridden by an environment variable of the same name;
command-line flags of the front ends override both (see `Settings.with_overrides`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class Settings:
    # Where the images are and where their index lives.
    DATASET_FOLDER: str = "dataset"
    CHROMA_DB_PATH: str = "./chroma_db"
    CHROMA_HOST: str = ""
    CHROMA_PORT: int = 8001
    COLLECTION_NAME: str = "image_embeddings"
    # Where the on-disk mirror of the collection (vectors, metadata, keywords) lives; empty means
    # <CHROMA_DB_PATH>/mirror with an embedded database, ~/.cache/semantic-image-search/mirror with a server.
    MIRROR_FOLDER: str = ""
    METADATA_FILE_NAMES: str = "metadata.csv,metadata.json"
    # Custom metadata limits (metadata files and POST /index alike); Chroma breaks past ~5,400 values.
    METADATA_MAX_RECORDS: int = 500000
    METADATA_MAX_FIELDS: int = 100
    METADATA_MAX_NAME_CHARS: int = 64
    METADATA_MAX_VALUE_CHARS: int = 10000
    METADATA_MAX_LIST_ITEMS: int = 100
    METADATA_MAX_VALUES: int = 1000
    # The model.
    MODEL_NAME: str = "ViT-B/32"
    DEVICE: str = "auto"
    # Indexing. BATCH_SIZE 0: 256 images per batch on CUDA, 64 on mps, 32 on the CPU. LOADER_PROCESSES -1:
    # one decoding process per core the model leaves free (none on a 2-core CPU); 0: LOADER_THREADS
    # threads of the indexing process decode instead (loaders.py).
    BATCH_SIZE: int = 0
    LOADER_PROCESSES: int = -1
    LOADER_THREADS: int = 2
    # JPEG decoding: "cpu" (Pillow, in the loaders), "gpu" (torchvision on the model's device: nvJPEG on
    # CUDA) or "auto" (gpu on CUDA where a sample of the run measures it faster and close, device_decode.py).
    IMAGE_DECODE: str = "auto"
    # CPU threads of torch for the whole process (0: torch's default, one per core). On a machine whose
    # cores other busy processes share, 1 keeps query encoding steady (bench/RESULTS.md, Scale).
    TORCH_THREADS: int = 0
    # "torch", or "onnx": images encoded by ONNX Runtime on the CPU (same vectors, 1.27x faster here).
    IMAGE_RUNTIME: str = "torch"
    # "torch", or "onnx": query texts encoded by ONNX Runtime on the CPU (same vectors, 2.7x faster here).
    TEXT_RUNTIME: str = "torch"
    ONNX_CACHE_FOLDER: str = "~/.cache/semantic-image-search"
    # HNSW index of a new collection (recall@10 >= 0.99 at 100k vectors, see bench/RESULTS.md).
    HNSW_M: int = 32
    HNSW_EF_CONSTRUCTION: int = 200
    HNSW_EF_SEARCH: int = 1024
    # Queries over at most this many images (the library, or what a filter keeps) are ranked by exact
    # cosine over the mirror; beyond it by the HNSW graph (1M: 65-75 ms a scan on 2 cores, recall 1.0
    # where the graph's was 0.74; see bench/RESULTS.md).
    EXACT_SEARCH_MAX: int = 1_000_000
    # In a library of at least this many images, exact searches are narrowed by 4-bit product-
    # quantisation codes (faiss fast scan, built in the background) instead of a scan of the float16
    # copy: candidates chosen in 9-14 ms at 1M on 2 cores instead of 45-146 ms (product_codes.py). 0: never.
    FIRST_PASS_MIN: int = 200_000
    # Search.
    TOP_K: int = 5
    MAX_TOP_K: int = 200
    MAX_OFFSET: int = 10000
    MAX_QUERY_CHARS: int = 1000
    MAX_QUERY_PARTS: int = 8
    MAX_FILTER_CHARS: int = 10000
    MAX_FILTER_VALUES: int = 1000
    DUPLICATE_THRESHOLD: float = 0.97
    ADAPTIVE_CUTOFF_RATIO: float = 0.5
    HYBRID_RRF_K: int = 60
    # Images.
    MAX_IMAGE_MEGAPIXELS: float = 100.0
    # Memory that all image decodes of a process may hold at once (uploads, thumbnails, loader threads).
    DECODE_MEMORY_MB: float = 2048.0
    THUMBNAIL_SIZE: int = 256
    # Front ends.
    RESULTS_FOLDER: str = "results"
    API_HOST: str = "127.0.0.1"
    API_PORT: int = 8000
    API_THREADS: int = 8
    # Open connections the server keeps (idle ones beyond it wait), and seconds before an idle one is closed.
    API_CONNECTION_LIMIT: int = 1000
    API_IDLE_SECONDS: int = 15
    # Unset: a random token is made once and kept in CHROMA_DB_PATH/api_token (README, Security).
    API_TOKEN: str = ""
    # Origins whose pages may use the API without the token (none by default; "null" is a page
    # opened from disk, or any sandboxed frame of any site).
    CORS_ORIGINS: str = ""
    # Host names the server answers to besides localhost, 127.0.0.1, [::1] and API_HOST ("*": any).
    ALLOWED_HOSTS: str = ""
    MAX_UPLOAD_MB: float = 20.0
    RATE_LIMIT_PER_MINUTE: int = 600
    LOG_LEVEL: str = "INFO"

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        """Defaults, overridden by environment variables of the same name."""
        environ = os.environ if environ is None else environ
        values = {
            field.name: _parse(field.name, environ[field.name], field.type)
            for field in fields(cls)
            if field.name in environ
        }
        return cls(**values)

    def with_overrides(self, **overrides: Any) -> Settings:
        """A copy with the given settings replaced; `None` values (flags not given) are ignored."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    @property
    def server_mode(self) -> bool:
        return bool(self.CHROMA_HOST)

    @property
    def cors_origins(self) -> list[str]:
        return [origin.strip() for origin in self.CORS_ORIGINS.split(",") if origin.strip()]

    @property
    def allowed_hosts(self) -> list[str]:
        return [host.strip() for host in self.ALLOWED_HOSTS.split(",") if host.strip()]

    @property
    def metadata_file_names(self) -> list[str]:
        return [name.strip() for name in self.METADATA_FILE_NAMES.split(",") if name.strip()]


def _parse(name: str, raw: str, type_name: Any) -> Any:
    type_name = getattr(type_name, "__name__", type_name)
    try:
        if type_name == "int":
            return int(raw)
        if type_name == "float":
            return float(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not a valid {type_name}") from None
    return raw


def load_settings(**overrides: Any) -> Settings:
    """The settings in force: defaults < environment variables < the given overrides."""
    return Settings.from_env().with_overrides(**overrides)


def add_index_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every front end shares: which images, which model, which database."""
    parser.add_argument("--dataset", help="folder of images (DATASET_FOLDER)")
    parser.add_argument("--model", help="CLIP model name or checkpoint path (MODEL_NAME)")
    parser.add_argument("--db", help="database folder (CHROMA_DB_PATH)")
    parser.add_argument("--collection", help="collection name (COLLECTION_NAME)")
    parser.add_argument("--device", help="cpu, cuda or auto (DEVICE)")


def index_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings named by the flags of `add_index_arguments`."""
    return {
        "DATASET_FOLDER": args.dataset,
        "MODEL_NAME": args.model,
        "CHROMA_DB_PATH": args.db,
        "COLLECTION_NAME": args.collection,
        "DEVICE": args.device,
    }
