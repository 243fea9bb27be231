# SPDX-License-Identifier: Apache-2.0
"""Checks the drop-in tests share (tests/test_skip_plan.py, test_architectures.py,
test_hybrids.py, test_patch.py)."""

import copy

import torch

import fastlayers


def assert_generate_equals_recompute(model, ids, out):
    """Each step's scores of a greedy ``generate(..., output_scores=True,
    return_dict_in_generate=True)`` equal the last logits of the whole sequence so far run without
    a cache (where the scores are finite: min_new_tokens masks the EOS token), and so do the tokens.
    Returns the sequence."""
    seq = ids
    for scores in out.scores:
        logits = model(seq, use_cache=False).logits[:, -1]
        logits = logits.masked_fill(~torch.isfinite(scores), -float("inf"))
        torch.testing.assert_close(scores, logits, rtol=1e-4, atol=1e-4)
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
    assert torch.equal(out.sequences, seq)
    return seq


def residual_norm_ratio(model, layer, batch) -> float:
    """``|h_out| / |h_in|`` of decoder ``layer`` (mean over tokens) as ``model`` runs ``batch``:
    what ``SkipPlan.from_similarity`` must measure for a sublayer when the layer's other sublayer
    answers zeros."""
    seen = {}

    def hook(mod, args, kwargs, out):
        seen["in"] = (args[0] if args else kwargs["hidden_states"]).float()
        seen["out"] = (out[0] if isinstance(out, tuple) else out).float()

    handle = layer.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(batch)
    finally:
        handle.remove()
    return (seen["out"].norm(dim=-1) / seen["in"].norm(dim=-1)).mean().item()


class Recording:
    """The compiled module, recording which of its functions are looked up."""

    def __init__(self, c):
        self._c, self.used = c, set()

    def __getattr__(self, name):
        self.used.add(name)
        return getattr(self._c, name)


def on_both_routes(model, step, monkeypatch):
    """``step`` run on a copy of ``model`` with the compiled kernels and on another with the
    compiled part switched off (every op on its reference): ``(kernels' result, reference's
    result, the compiled functions the kernels' run looked up)``."""
    recording, results = Recording(fastlayers._ext.C), []
    for c in (recording, None):
        m = copy.deepcopy(model)
        with monkeypatch.context() as mp:
            mp.setattr(fastlayers._ext, "C", c)
            results.append(step(m))
    return results[0], results[1], recording.used


def relative(got, want) -> float:
    """``|got - want| / |want|`` (norms over all values; ``want`` may be zero)."""
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


def assert_relative(got, want, rtol: float, what: str) -> None:
    """``relative(got, want) < rtol``."""
    err = relative(got, want)
    assert err < rtol, f"{what}: relative difference {err:.3e} (allowed {rtol:.1e})"
