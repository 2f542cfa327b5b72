"""Generation backends: ``hf`` (``model.generate`` in this process) and ``vllm`` (a ``vllm serve`` process).

Both answer the same chat-templated prompt token ids greedily and cut at the first EOS
(``generation.finish``), so an analysis or evaluation means the same thing on either. The vLLM
backend sends the exact prompt ids to the completions endpoint and gets the exact generated ids
back (``return_token_ids``); nothing is re-tokenised.

Routing with vLLM (``route_generated``): a GPU build started with ``--enable-return-routed-experts``
returns the experts it routed every token to, and those are stored as they are. Elsewhere (CPU
builds lack Model Runner V2) one teacher-forced HF forward over prompt + generated ids captures
the routing, with exactly the tokens and spans the HF ``generate`` capture records. The batch's
outputs and routing file say which one produced it (``routing_source``).

    with open_backend("vllm", model_dir, model, tok) as gen:     # None for "hf"
        samples = route_generated(model, tok, messages, 48, gen)
"""

from __future__ import annotations

import base64
import io
import os
import shlex
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import numpy as np

from moe_core.errors import MoELabError
from moe_core.judge.bounded_http import bounded_client, status_message
from moe_core.model.adapter import MoEAdapter
from moe_core.model.generation import Generation, Messages, generate_batch
from moe_core.model.routing import (
    SPAN_GENERATED,
    SPAN_RESPONSE,
    RoutedSample,
    SampleRouting,
    expert_id_dtype,
    route_sequences,
)
from moe_core.model.vllm_server import Server, ServerSettings, VLLMError, serve
from moe_core.store.events import log_tail

Backend = Literal["hf", "vllm"]
BACKENDS: tuple[str, ...] = get_args(Backend)
SOURCE_HF_GENERATE = "hf-generate"  # router hooks during model.generate
SOURCE_TEACHER_FORCED = "hf-teacher-forced"  # one HF forward over prompt + generated ids
SOURCE_VLLM = "vllm-routed-experts"  # vLLM's enable_return_routed_experts


def check_backend(backend: str, vllm_url: str | None = None) -> str:
    if backend not in BACKENDS:
        raise MoELabError(f"unknown generation backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if vllm_url and backend != "vllm":
        raise MoELabError("--vllm-url only applies with --backend vllm")
    return backend


@dataclass
class VLLMGenerator:
    """Greedy completions of exact token ids from an OpenAI-compatible vLLM server."""

    server: Server
    timeout: float = field(default_factory=lambda: float(os.environ.get("MOE_LAB_VLLM_TIMEOUT_S", 600)))
    max_bytes: int = 1 << 30  # one batch's answers with their routing: a few MB on real models
    name: str = "vllm"

    def __post_init__(self) -> None:
        from openai import OpenAI

        if not self.timeout > 0:
            raise MoELabError(
                f"the vLLM request deadline must be > 0 s ($MOE_LAB_VLLM_TIMEOUT_S), got {self.timeout}"
            )
        self.client = OpenAI(  # timeout: the total per batch request ($MOE_LAB_VLLM_TIMEOUT_S); no redirects
            base_url=self.server.url,
            api_key="EMPTY",
            timeout=self.timeout,
            max_retries=0,
            http_client=bounded_client(self.timeout, self.max_bytes),
        )

    def complete(
        self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, eos_ids: Sequence[int]
    ) -> list[tuple[list[int], dict[str, Any]]]:
        """One request for the whole batch; temperature 0; stops at any of ``eos_ids``."""
        import openai

        if not prompt_ids:
            return []
        try:
            resp = self.client.completions.create(
                model=self.server.model,
                prompt=[list(map(int, p)) for p in prompt_ids],
                max_tokens=max_new_tokens,
                temperature=0.0,
                n=1,
                extra_body={
                    "return_token_ids": True,
                    "stop_token_ids": [int(e) for e in eos_ids],
                    "skip_special_tokens": False,
                    "top_k": -1,
                    "seed": 0,
                },
            )
        except openai.APITimeoutError:
            raise VLLMError(
                f"the vLLM server at {self.server.url} did not finish the batch within {self.timeout:g} s "
                "(raise $MOE_LAB_VLLM_TIMEOUT_S for long answers); nothing of this batch was written: resume "
                "the job to redo it"
            ) from None
        except openai.APIConnectionError as e:
            raise VLLMError(
                f"the vLLM server at {self.server.url} stopped answering ({e.__cause__ or e}); nothing of this "
                "batch was written: resume the job to redo it"
            ) from None
        except openai.APIStatusError as e:  # 5xx: the engine failed; its log says why
            tail = (
                f"\nServer log tail ({self.server.log_path}):\n{log_tail(self.server.log_path, 12)}"
                if e.status_code >= 500 and self.server.log_path
                else ""
            )
            detail = status_message(e.status_code, e.response.headers, e.message)
            raise VLLMError(
                f"the vLLM server refused the request ({e.status_code}): {detail}{tail}"
            ) from None
        choices = sorted(resp.choices, key=lambda c: c.index)
        out = []
        for c in choices:
            extra = c.model_extra or {}
            ids = extra.get("token_ids")
            if ids is None:
                raise VLLMError(
                    "this vLLM server does not return token ids (return_token_ids); use vLLM >= 0.10.2"
                )
            out.append(
                (
                    list(ids),
                    {
                        "finish_reason": c.finish_reason,
                        "routed_experts": _decode_routed(extra.get("routed_experts")),
                    },
                )
            )
        if len(out) != len(prompt_ids):
            raise VLLMError(f"asked vLLM for {len(prompt_ids)} completions, got {len(out)}")
        return out


def _decode_routed(b64: str | None) -> np.ndarray | None:
    """vLLM's routed experts: base64 ``.npy`` of ``[tokens - 1, layers, k]`` (loaded without pickle)."""
    if not b64:
        return None
    return np.load(io.BytesIO(base64.b64decode(b64)), allow_pickle=False)


@contextmanager
def open_backend(
    backend: str,
    model_dir: str | None,
    vllm_url: str | None = None,
    settings: ServerSettings | None = None,
    keep: bool = False,
) -> Iterator[VLLMGenerator | None]:
    """The generator for ``backend`` for the block: None for ``hf``; a started, reused or given vLLM server."""
    check_backend(backend, vllm_url)
    if backend == "hf":
        yield None
        return
    if model_dir is None and settings is None:
        raise MoELabError("the vLLM backend needs a model directory (the in-memory model cannot be served)")
    # $MOE_LAB_VLLM_ARGS: more `vllm serve` flags for servers the lab starts, e.g. "--tensor-parallel-size 4"
    extra = tuple(shlex.split(os.environ.get("MOE_LAB_VLLM_ARGS", "")))
    settings = settings or ServerSettings(str(model_dir), extra_args=extra)
    with serve(settings, url=vllm_url, keep=keep) as server:
        yield VLLMGenerator(server)


# -- routing of answers another engine generated -----------------------------------------------
def routed_count(g: Generation, max_new_tokens: int) -> int:
    """How many answer tokens get routing: those ``generate`` feeds back (see ``routing`` docstring).

    An answer that stopped at EOS feeds every token; one cut at ``max_new_tokens`` all but its last.
    """
    return min(len(g.new_ids), max_new_tokens - 1)


def _from_vllm(g: Generation, n: int, adapter: MoEAdapter, num_layers: int) -> SampleRouting:
    """vLLM's ``[tokens - 1, layers, k]`` routed ids -> our ``[moe_layers, T, k]`` record (no weights)."""
    arr = np.asarray(g.meta["routed_experts"])
    t = len(g.prompt_ids) + n
    if arr.ndim != 3 or arr.shape[0] < t:
        raise VLLMError(
            f"vLLM returned routed experts of shape {arr.shape}, expected at least {t} token rows"
        )
    if arr.shape[1] == num_layers:
        arr = arr[:, adapter.moe_layers]
    elif arr.shape[1] != len(adapter.moe_layers):
        raise VLLMError(
            f"vLLM returned routing for {arr.shape[1]} layers; the model has {num_layers} layers, "
            f"{len(adapter.moe_layers)} of them MoE"
        )
    ids = np.ascontiguousarray(arr[:t].transpose(1, 0, 2)).astype(expert_id_dtype(adapter.num_experts))
    tokens = np.asarray(list(g.prompt_ids) + list(g.new_ids[:n]), np.int32)
    spans = np.concatenate([np.zeros(len(g.prompt_ids), np.uint8), np.full(n, SPAN_GENERATED, np.uint8)])
    return SampleRouting(ids, None, tokens, spans)


def route_generated(
    model: Any,
    tokenizer: Any,
    messages_list: Sequence[Messages],
    max_new_tokens: int,
    generator: Any,
    adapter: MoEAdapter | None = None,
) -> tuple[list[RoutedSample], str]:
    """Answers from ``generator`` with the routing of prompt + answer tokens -> (samples, routing_source).

    Records hold the same tokens and spans as ``route_batch(scope="generated")`` with HF generate.
    """
    if max_new_tokens < 1:
        raise MoELabError(f"max_new_tokens={max_new_tokens}: generation needs >= 1")
    adapter = adapter or MoEAdapter.for_model(model)
    gens = generate_batch(model, tokenizer, messages_list, max_new_tokens, generator)
    counts = [routed_count(g, max_new_tokens) for g in gens]
    if gens and all(g.meta.get("routed_experts") is not None for g in gens):  # GPU: vLLM's own routing
        layers = int(model.config.get_text_config().num_hidden_layers)
        routings = [_from_vllm(g, n, adapter, layers) for g, n in zip(gens, counts)]
        source = SOURCE_VLLM
    else:
        routings = route_sequences(
            model,
            [g.prompt_ids for g in gens],
            [g.new_ids[:n] for g, n in zip(gens, counts)],
            tokenizer.pad_token_id,
            adapter,
        )
        for r in routings:
            r.spans[r.spans == SPAN_RESPONSE] = SPAN_GENERATED
        source = SOURCE_TEACHER_FORCED
    for g in gens:
        g.meta.pop("routed_experts", None)  # kept in the routing record, not in every Generation
    return [RoutedSample(g, r) for g, r in zip(gens, routings)], source
