"""What the REST and gRPC SDK clients share, whatever carries their calls: the client options and the
retry backoff, the checks of a request's arguments made before anything is sent, and the decoding of
the tensors in an answer.

``service.client`` (REST, sync and async) and ``service.grpc_client`` (gRPC, sync and async) build
their requests and read their answers with these; only the wire format and the I/O differ.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from kvtier.kvstore import FrameError, KVSpec

from . import wire
from .errors import ServiceError


class ClientBase:
    """Options every client takes (``timeout`` per call in seconds, ``retries`` of a transient failure,
    ``backoff_s`` before the first retry, doubling), checked once, and the specs it registered."""

    def __init__(self, timeout: float, retries: int, backoff_s: float) -> None:
        if retries < 0 or timeout <= 0 or backoff_s < 0:
            raise ValueError(f"retries >= 0, timeout > 0, backoff_s >= 0 expected, got {retries}, {timeout}, {backoff_s}")
        self.timeout, self.retries, self.backoff_s = timeout, retries, backoff_s
        self._specs: dict[str, KVSpec] = {}

    def _delay(self, attempt: int) -> float:
        """Seconds to wait before retry ``attempt + 1``: exponential backoff with jitter (50-100%)."""
        return self.backoff_s * (2**attempt) * (0.5 + random.random() / 2)


def check_chain(token_ids: Any, hashes: Any) -> None:
    """A chain is given by its token ids or by its block hashes: exactly one of them."""
    if (token_ids is None) == (hashes is None):
        raise ValueError("give exactly one of token_ids and hashes")


def token_list(token_ids: Any) -> list[int]:
    """Token ids (a list, a tuple, a numpy array or a tensor) as a list of ints."""
    return token_ids.tolist() if hasattr(token_ids, "tolist") else list(token_ids)


def query_tensor(q: Any, token_ids: Any, hashes: Any) -> dict:
    """The checked arguments of ``retrieve``/``attention``: ``q [L_q, H_q, D]`` as a wire tensor ``{dtype, shape, data}``."""
    check_chain(token_ids, hashes)
    if not isinstance(q, torch.Tensor):
        raise ValueError(f"q must be a tensor [L_q, H_q, D], got {type(q).__name__}")
    return wire.tensor_to_wire(q)


def answer_tensor(obj: Any, name: str) -> torch.Tensor:
    """The tensor ``name`` of an answer (a wire tensor ``{dtype, shape, data}``); ``FrameError`` if it is not one."""
    try:
        return wire.tensor_from_wire(obj, name, dtypes=("float32", "int64"), max_elements=1 << 40)
    except ServiceError as e:
        raise FrameError(f"the answer's {name} is not a tensor: {e}") from None
