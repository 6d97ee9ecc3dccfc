"""``alacarte serve``: run the composition service (``server.service``) until SIGINT/SIGTERM.

``--add-token USER --sources a,b`` and ``--revoke-token USER`` edit the ``--tokens`` file
(``server.auth``) and exit. The backbone is configured as the Flower app's (``AppConfig`` defaults);
the pool is opened read-only.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from PIL import Image
from torch import Tensor

from common.config import add_backbone_arguments, backbone_config, build_model
from common.data import FASHION_MNIST_CLASSES, MNIST_CLASSES, backbone_transform
from common.model import APTViT
from server.auth import TokenFileError, add_user, remove_user
from server.pool import PoolError, PromptPool
from server.service import CompositionServer, MiB, ServiceConfig, is_loopback

__all__ = ["HELP", "add_arguments", "load_class_names", "run"]

logger = logging.getLogger(__name__)

HELP = "serve composition queries over gRPC from a prompt pool"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``alacarte serve``."""
    limits = ServiceConfig()
    model = parser.add_argument_group("model and pool")
    model.add_argument("--pool", type=Path, default=None,
                       help="prompt pool directory (default: $ALACARTE_POOL, else $ALACARTE_HOME/pool)")
    add_backbone_arguments(model)
    model.add_argument("--classes", default=None,
                       help="class names: fashion_mnist, mnist, or a file (one per line or a JSON list)")
    net = parser.add_argument_group("network and security")
    net.add_argument("--host", default=limits.host, help="address to bind (default: %(default)s)")
    net.add_argument("--port", type=int, default=limits.port, help="port, 0 = any free one (default: %(default)s)")
    net.add_argument("--tls-cert", type=Path, default=None, help="PEM certificate chain (enables TLS)")
    net.add_argument("--tls-key", type=Path, default=None, help="PEM private key of --tls-cert")
    net.add_argument("--tokens", type=Path, default=None,
                     help="tokens file (JSON of salted hashes); without it only loopback is served, unauthenticated")
    net.add_argument("--add-token", metavar="USER", default=None,
                     help="create or replace USER's token in --tokens, print it once and exit")
    net.add_argument("--sources", default=None, help="with --add-token: comma-separated sources, or '*' for all")
    net.add_argument("--revoke-token", metavar="USER", default=None, help="remove USER from --tokens and exit")
    perf = parser.add_argument_group("batching and limits")
    perf.add_argument("--max-batch", type=int, default=limits.max_batch,
                      help="images per backbone pass (default: %(default)s)")
    perf.add_argument("--max-queue", type=int, default=limits.max_queue,
                      help="requests waiting before RESOURCE_EXHAUSTED (default: %(default)s)")
    perf.add_argument("--max-wait-ms", type=float, default=limits.max_wait * 1000,
                      help="wait to fill a batch, in ms (default: %(default)s)")
    perf.add_argument("--max-images", type=int, default=limits.max_images,
                      help="images per request (default: %(default)s)")
    perf.add_argument("--max-request-pixels", type=int, default=limits.max_request_pixels,
                      help="decoded pixels of all images of one request (default: %(default)s)")
    perf.add_argument("--max-message-mb", type=int, default=limits.max_message_bytes // MiB,
                      help="largest request or response, MiB (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    """Run ``alacarte serve`` until SIGINT/SIGTERM (or a token command): 0 ok, 2 bad setup."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.add_token or args.revoke_token:
        return _edit_tokens(args)
    try:
        config = _service_config(args)
        model, pool, transform = _load(args)
        server = CompositionServer(model, pool, config, transform)
    except (ValueError, OSError, PoolError, TokenFileError, RuntimeError) as err:
        print(f"alacarte serve: {err}", file=sys.stderr)
        return 2
    if config.tokens is None:
        logger.warning("no --tokens: serving WITHOUT authentication (loopback only)")
    elif config.tls_cert is None and not is_loopback(config.host):
        logger.warning("tokens travel in cleartext: pass --tls-cert/--tls-key when serving %s", config.host)
    print(f"alacarte serve: listening on {server.address} ({'TLS' if config.tls_cert else 'plaintext'}, "
          f"{'tokens ' + str(config.tokens) if config.tokens else 'no auth'}, backbone {model.backbone_name})",
          flush=True)
    _wait_for_signal()
    server.stop()
    return 0


def load_class_names(spec: str) -> tuple[str, ...]:
    """Class names from a built-in dataset name (``fashion_mnist``, ``mnist``) or a file.

    A file holds one name per line, or a JSON list of names.
    """
    builtin = {"fashion_mnist": FASHION_MNIST_CLASSES, "mnist": MNIST_CLASSES}
    if spec in builtin:
        return tuple(builtin[spec])
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ValueError(f"--classes {spec!r} is neither {' nor '.join(builtin)} nor an existing file")
    text = path.read_text()
    if text.lstrip().startswith("["):
        return tuple(map(str, json.loads(text)))
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def _edit_tokens(args: argparse.Namespace) -> int:
    if args.tokens is None:
        print("alacarte serve: --add-token/--revoke-token need --tokens FILE", file=sys.stderr)
        return 2
    try:
        if args.revoke_token:
            remove_user(args.tokens, args.revoke_token)
            print(f"revoked the token of {args.revoke_token!r} in {args.tokens}")
            return 0
        if not args.sources:
            raise ValueError("--add-token needs --sources a,b (or '*' for every source)")
        sources = "*" if args.sources.strip() == "*" else [s.strip() for s in args.sources.split(",") if s.strip()]
        token = add_user(args.tokens, args.add_token, sources)
    except (ValueError, KeyError, TokenFileError, OSError) as err:
        print(f"alacarte serve: {err}", file=sys.stderr)
        return 2
    print(f"token for {args.add_token!r} (shown once; only its hash is stored in {args.tokens}):\n{token}")
    return 0


def _service_config(args: argparse.Namespace) -> ServiceConfig:
    return ServiceConfig(
        host=args.host, port=args.port, tls_cert=args.tls_cert, tls_key=args.tls_key, tokens=args.tokens,
        class_names=load_class_names(args.classes) if args.classes else (), max_batch=args.max_batch,
        max_queue=args.max_queue, max_wait=args.max_wait_ms / 1000, max_images=args.max_images,
        max_request_pixels=args.max_request_pixels, max_message_bytes=args.max_message_mb * MiB)


def _load(args: argparse.Namespace) -> tuple[APTViT, PromptPool, Callable[[Image.Image], Tensor]]:
    """The backbone (as the Flower app configures it), the existing pool (read-only) and the transform."""
    config = backbone_config(args, pool_dir=str(args.pool or ""))
    pool = PromptPool(config.pool_path(), read_only=True)
    model = build_model(config, device=args.device)
    return model, pool, backbone_transform(model.backbone)


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
