"""Q-GaLore (``create_optimizer("q-galore")``): 4-bit projections and lazy per-layer subspace updates, against
q-galore-torch 1.0's own projector (``q_galore_projector_simulate.GaLoreProjector``) on the same gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradspace import basis_storage, create_optimizer

reference = pytest.importorskip("q_galore_torch.q_galore_projector_simulate")


def _gradients(m: int, n: int, steps: int, drift: float) -> list[torch.Tensor]:
    """A gradient whose top subspace moves slowly (``drift`` per step), so its first singular vector settles."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(m, 8, generator=g) @ torch.randn(8, n, generator=g) * torch.linspace(3, 1, n)
    moves = [torch.randn(m, n, generator=g) for _ in range(steps)]
    return [base + drift * t * moves[t] for t in range(steps)]


@pytest.mark.parametrize("drift", [0.001, 100.0])
def test_the_basis_and_the_growing_gap_match_q_galore_torch(drift):
    m, n, rank, gap = 384, 256, 8, 2  # m >= n: the basis on the right, where the 4-bit layouts are the same
    grads = _gradients(m, n, 40, drift)
    theirs = reference.GaLoreProjector(
        rank, update_proj_gap=gap, quant=True, group_size=256, n_bit=4, cos_threshold=0.4, gamma_proj=2, queue_size=3
    )
    weight = nn.Parameter(torch.zeros(m, n))
    ours = create_optimizer(
        "q-galore", [{"params": [weight], "rank": rank}], lr=1e-3, update_proj_gap=gap, queue_size=3
    )
    gaps = []
    for t, grad in enumerate(grads):
        low = theirs.project(grad, t)
        weight.grad = grad.clone()
        ours.step()
        state = ours.state[weight]
        basis = basis_storage.load(state)  # n x r, dequantised: the basis this step projected with
        deq = theirs.ortho_matrix_scales * (theirs.ortho_matrix.to(torch.float32) - theirs.ortho_matrix_zeros)
        torch.testing.assert_close(basis, deq.reshape(theirs.ortho_matrix_shape).mT, atol=1e-6, rtol=0)
        torch.testing.assert_close(grad @ basis, low, atol=1e-4, rtol=1e-5)
        assert state["tracker"]["gap"] == theirs.update_proj_gap, t
        gaps.append(state["tracker"]["gap"])
    if drift < 0.01:
        assert gaps[-1] > gap  # a settled subspace: the gap grew
    else:
        assert gaps[-1] == gap  # a moving one: refreshed every update_proj_gap steps


def test_the_4bit_basis_is_q_galore_torchs_quantisation_packed_two_codes_a_byte():
    basis = torch.linalg.qr(torch.randn(512, 16, generator=torch.Generator().manual_seed(0))).Q
    state: dict = {}
    basis_storage.store(state, basis, {"basis_dtype": "int4"})
    projector = reference.GaLoreProjector(16, quant=True, group_size=256, n_bit=4)
    codes, scales, zeros, shape = projector._quantize(basis.mT.contiguous(), q_group_size=256, n_bit=4)
    expected = (scales * (codes.float() - zeros)).reshape(shape).mT
    assert torch.equal(basis_storage.load(state), expected)
    assert state["basis"].dtype == torch.uint8 and state["basis"].numel() == 512 * 16 // 2
    stored = sum(v.numel() * v.element_size() for v in state.values())
    assert stored == basis_storage.basis_bytes(512, 16, {"basis_dtype": "int4"})


def test_q_galore_trains_int8_weights_checkpoints_and_resumes_exactly():
    from gradspace.train.models import build_llama

    def run(steps: int, resume=None):
        torch.manual_seed(0)
        model = build_llama("tiny", vocab_size=300, int8_group_size=64)
        opt = create_optimizer("q-galore", model, lr=1e-2, rank=8, update_proj_gap=2, base="adamw8bit")
        if resume is not None:
            model.load_state_dict(resume[0])
            opt.load_state_dict(resume[1])
        ids = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(1))
        losses = []
        for _ in range(steps):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        return model, opt, losses

    model, _, losses = run(12)
    assert losses[-1] < losses[0]
    half_model, half_opt, _ = run(6)
    saved = (half_model.state_dict(), half_opt.state_dict())
    resumed, _, _ = run(6, resume=saved)
    for (k, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize(
    "option, value, message",
    [("cos_threshold", 2.0, "cos_threshold must be"), ("gamma_proj", 0.5, "gamma_proj must be"),
     ("queue_size", 0, "queue_size must be")],
)  # fmt: skip
def test_bad_lazy_update_options_are_errors(option, value, message):
    with pytest.raises(ValueError, match=message):
        create_optimizer("q-galore", [{"params": [nn.Parameter(torch.zeros(8, 8))], "rank": 2}], **{option: value})
