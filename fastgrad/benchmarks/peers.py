"""The peers: PyTorch (eager, CPU and CUDA) and JAX versions of the workloads.

Same network, initial weights, mini-batches and exact cross-entropy as the
fastgrad workloads, in each library's own idiom: PyTorch autograd plus a
manual SGD update per step, JAX one jitted ``lax.scan`` over all steps.
Neither package is a dependency of fastgrad. This module is imported only by
the benchmarks, and imports torch or jax only inside the function that times
them, so nothing on the import path of the library's kernels loads a peer; a
peer that cannot run here is skipped with :func:`peer_unavailable_reason`.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fastgrad.benchmarks.workloads import (
    BACKPROP_ATOL,
    LEARNING_RATE,
    PEERS,
    Case,
    NetSpec,
    WorkloadFactory,
)

__all__ = [
    "PEERS",
    "available_peers",
    "describe",
    "gradient_case",
    "limit_threads",
    "peer_unavailable_reason",
    "train_case",
]

_PEER_PACKAGES = {"torch-cpu": "torch", "torch-cuda": "torch", "jax": "jax"}


def peer_unavailable_reason(peer: str) -> str | None:
    """Why ``peer`` cannot run here (package missing, no CUDA), or None when it can."""
    package = _PEER_PACKAGES[peer]
    if importlib.util.find_spec(package) is None:
        return f"{package} is not installed (pip install {package}); skipped"
    if peer == "torch-cuda":
        import torch

        if not torch.cuda.is_available():
            return "PyTorch has no CUDA device here; skipped"
    return None


def available_peers(peers: Sequence[str] = PEERS) -> tuple[list[str], dict[str, str]]:
    """The peers that can run, and a reason for each that cannot."""
    runnable, skipped = [], {}
    for peer in peers:
        reason = peer_unavailable_reason(peer)
        if reason is None:
            runnable.append(peer)
        else:
            skipped[peer] = reason
    return runnable, skipped


# The peers run the same network, init, batches and loss (exact log-softmax
# cross-entropy, batch mean) in their own idiom: PyTorch eager with autograd
# and a manual SGD update; JAX one jitted function that runs every step with
# lax.scan. Parameters travel as the flat tuple W1, b1, ..., WL, bL.
def _torch_device(peer: str) -> tuple[Any, Any]:
    import torch

    return torch, torch.device("cuda" if peer == "torch-cuda" else "cpu")


def _torch_synchronize(torch: Any, device: Any) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _torch_loss(torch: Any, activation: str) -> Callable[..., Any]:
    act = {
        "sigmoid": torch.sigmoid,
        "relu": torch.relu,
        "tanh": torch.tanh,
        "identity": lambda values: values,
    }[activation]

    def loss(params: Sequence[Any], X: Any, labels: Any) -> Any:
        hidden = X
        for W, b in zip(params[0:-2:2], params[1:-2:2], strict=True):
            hidden = act(hidden @ W + b)
        return torch.nn.functional.cross_entropy(hidden @ params[-2] + params[-1], labels)

    return loss


def _jax_modules() -> tuple[Any, Any]:
    import jax
    import jax.numpy as jnp

    # float64 needs x64 mode; float32 arrays stay float32 under it.
    jax.config.update("jax_enable_x64", True)
    return jax, jnp


def _jax_loss(jax: Any, jnp: Any, activation: str) -> Callable[..., Any]:
    act = {
        "sigmoid": jax.nn.sigmoid,
        "relu": jax.nn.relu,
        "tanh": jnp.tanh,
        "identity": lambda values: values,
    }[activation]

    def loss(params: Sequence[Any], X: Any, labels: Any) -> Any:
        hidden = X
        for W, b in zip(params[0:-2:2], params[1:-2:2], strict=True):
            hidden = act(hidden @ W + b)
        log_p = jax.nn.log_softmax(hidden @ params[-2] + params[-1])
        return -jnp.mean(jnp.take_along_axis(log_p, labels[:, None], axis=1))

    return loss


def train_case(
    factory: WorkloadFactory,
    peer: str,
    dtype: str,
    steps: int,
    net: NetSpec,
    workload: str,
    ceiling: float,
) -> Case:
    """``steps`` SGD iterations of ``net`` on ``peer``, as :meth:`WorkloadFactory.train_case`."""
    schedule = factory.batch_schedule(steps)
    X_host = factory.inputs(dtype)
    labels_host = factory.dataset.labels
    init = factory.initial_params(net, dtype)

    if peer == "jax":
        jax, jnp = _jax_modules()
        loss_fn = _jax_loss(jax, jnp, net.activation)
        X, labels, rows = jnp.asarray(X_host), jnp.asarray(labels_host), jnp.asarray(schedule)

        @jax.jit
        def train(params: Any, X: Any, labels: Any, rows: Any) -> Any:
            def step(params: Any, batch: Any) -> Any:
                loss, grads = jax.value_and_grad(loss_fn)(params, X[batch], labels[batch])
                updated = tuple(p - LEARNING_RATE * g for p, g in zip(params, grads, strict=True))
                return updated, loss

            return jax.lax.scan(step, params, rows)

        def jax_setup() -> Any:
            return tuple(jnp.asarray(array) for array in init.arrays)

        def jax_run(params: Any) -> Any:
            # One compiled call for all steps: compiled in the untimed warm-up call.
            return jax.block_until_ready(train(params, X, labels, rows)[1])

        return Case(
            workload,
            peer,
            "backprop",
            dtype,
            net,
            factory.batch_size,
            jax_setup,
            jax_run,
            lambda losses: factory.check_losses(np.asarray(losses), steps, ceiling),
            iterations=steps,
            notes={"device": str(jax.devices()[0]), "loop": "lax.scan"},
        )

    torch, device = _torch_device(peer)
    loss_fn = _torch_loss(torch, net.activation)
    X = torch.from_numpy(X_host).to(device)
    labels = torch.from_numpy(labels_host).to(device)
    batch_indices = torch.from_numpy(schedule).to(device)

    def setup() -> list[Any]:
        return [torch.tensor(array, device=device, requires_grad=True) for array in init.arrays]

    def run(params: list[Any]) -> Any:
        # Losses stay on the device: reading each one would synchronise a GPU
        # every step, which fastgrad's own loops do not do either.
        losses = torch.empty(steps, dtype=torch.float64, device=device)
        for step in range(steps):
            rows = batch_indices[step]
            loss = loss_fn(params, X[rows], labels[rows])
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for param, grad in zip(params, grads, strict=True):
                    param.sub_(grad, alpha=LEARNING_RATE)
            losses[step] = loss.detach()
        _torch_synchronize(torch, device)
        return losses

    return Case(
        workload,
        peer,
        "backprop",
        dtype,
        net,
        factory.batch_size,
        setup,
        run,
        lambda losses: factory.check_losses(losses.cpu().numpy(), steps, ceiling),
        iterations=steps,
        notes={"threads": torch.get_num_threads()} if device.type == "cpu" else {},
    )


def gradient_case(
    factory: WorkloadFactory, peer: str, method: str, net: NetSpec, workload: str
) -> Case:
    """One float64 backprop gradient of ``net`` on ``peer``, checked against NumPy's."""
    if method != "backprop":
        raise ValueError(f"peers are timed on backprop only, not {method!r}")
    X_host, labels_host = factory.gradient_batch()
    init = factory.initial_params(net)
    reference = factory.reference_gradient(net)

    if peer == "jax":
        jax, jnp = _jax_modules()
        gradient = jax.jit(jax.grad(_jax_loss(jax, jnp, net.activation)))
        X, labels = jnp.asarray(X_host), jnp.asarray(labels_host)

        def jax_run(params: Any) -> dict[str, Any]:
            return init.named(jax.block_until_ready(gradient(params, X, labels)))

        return Case(
            workload,
            peer,
            "backprop",
            "float64",
            net,
            factory.batch_size,
            lambda: tuple(jnp.asarray(array) for array in init.arrays),
            jax_run,
            factory.gradient_check(reference, np.asarray, BACKPROP_ATOL["float64"]),
        )

    torch, device = _torch_device(peer)
    loss_fn = _torch_loss(torch, net.activation)
    X = torch.from_numpy(X_host.copy()).to(device)
    labels = torch.from_numpy(labels_host.copy()).to(device)

    def setup() -> list[Any]:
        return [torch.tensor(array, device=device, requires_grad=True) for array in init.arrays]

    def run(params: list[Any]) -> dict[str, Any]:
        grads = torch.autograd.grad(loss_fn(params, X, labels), params)
        _torch_synchronize(torch, device)
        return init.named(grads)

    return Case(
        workload,
        peer,
        "backprop",
        "float64",
        net,
        factory.batch_size,
        setup,
        run,
        factory.gradient_check(
            reference, lambda t: t.detach().cpu().numpy(), BACKPROP_ATOL["float64"]
        ),
    )


def describe(peers: Sequence[str]) -> dict[str, str]:
    """What the peers' timings depend on beyond the package versions: PyTorch's threads."""
    if not any(peer.startswith("torch") for peer in peers):
        return {}
    import torch

    return {"torch threads": str(torch.get_num_threads())}


def limit_threads(threads: int, peers: Sequence[str], stack: contextlib.ExitStack) -> None:
    """Cap PyTorch's CPU threads at ``threads`` until ``stack`` closes (``--threads``)."""
    if any(peer.startswith("torch") for peer in peers):
        import torch

        stack.callback(torch.set_num_threads, torch.get_num_threads())
        torch.set_num_threads(threads)
