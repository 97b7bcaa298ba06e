"""Device-side prompt lookup and verdict (kernels/lookup_draft.py): the torch definitions
against a plain scan and by hand, and the Triton kernels against the definitions."""

import random

import pytest
import torch
from editkv.kernels.lookup_draft import MAX_MATCH, accept_ref, accept_triton, draft_ref, draft_triton
from helpers import KERNEL_DEVICE, needs_triton

DEVICE = KERNEL_DEVICE


def _buffer(tokens: list[int], size: int) -> torch.Tensor:
    padded = torch.full((MAX_MATCH + size + 1,), -1, dtype=torch.long)
    padded[:MAX_MATCH] = -3
    padded[MAX_MATCH : MAX_MATCH + len(tokens)] = torch.tensor(tokens)
    return padded.to(DEVICE)


def _state(last: int, length: int) -> torch.Tensor:
    return torch.tensor([last, 100, 40, 0, length, 0], dtype=torch.long, device=DEVICE)


def _scan(tokens: list[int], width: int) -> list[int]:
    """The drafts by definition: the longest, then latest, run of the last tokens."""
    length = len(tokens)
    best = (0, -1)
    for p in range(length):
        run = 0
        while run < MAX_MATCH and p - 1 - run >= 0 and tokens[p - 1 - run] == tokens[length - 1 - run] >= 0:
            run += 1
        if run and tokens[p] >= 0:
            best = max(best, (run, p))
    start = max(best[1], 0)
    return [max(tokens[i], 0) if i < length else 0 for i in range(start, start + width - 1)]


def _sources(rng: random.Random) -> list[int]:
    """References and a history over a small vocabulary, with copies and separators."""
    history = [rng.randrange(6) for _ in range(rng.randint(1, 60))]
    ref = history[rng.randrange(len(history)) :] + [rng.randrange(6) for _ in range(rng.randint(0, 20))]
    return [-1, *ref, -1, *[rng.randrange(6) for _ in range(rng.randint(0, 30))], -1, *history]


def _staged(stage, padded, state, width):
    ids = torch.zeros(width, dtype=torch.long, device=DEVICE)
    positions, slots = torch.zeros_like(ids), torch.zeros_like(ids)
    stage(padded, state, ids, positions, slots)
    return ids.tolist(), positions.tolist(), slots.tolist()


@pytest.mark.parametrize("width", [2, 8, 16])
def test_draft_ref_is_the_longest_then_latest_match(width):
    rng = random.Random(width)
    for _ in range(40):
        tokens = _sources(rng)
        padded, state = _buffer(tokens, 200), _state(tokens[-1], len(tokens))
        ids, positions, slots = _staged(draft_ref, padded, state, width)
        assert ids == [tokens[-1], *_scan(tokens, width)]
        assert positions == list(range(100, 100 + width)) and slots == list(range(40, 40 + width))


def test_draft_ref_copies_what_followed_the_tail():
    tokens = [-1, 9, 1, 2, 3, 4, 5, -1, 7, 1, 2, 3, 8, 8, 1, 2, 3]
    ids, _, _ = _staged(draft_ref, _buffer(tokens, 64), _state(3, len(tokens)), 4)
    assert ids == [3, 8, 8, 1]  # "1 2 3" twice: the latest wins
    tokens = [-1, 5, 1, 2, 3, 4, 6, -1, 7, 1, 2, 3, 8, 0, 5, 1, 2, 3]
    ids, _, _ = _staged(draft_ref, _buffer(tokens, 64), _state(3, len(tokens)), 4)
    assert ids == [3, 4, 6, 0]  # "5 1 2 3" is longer; the separator after the reference reads as 0


@needs_triton
@pytest.mark.parametrize("width", [2, 4, 8, 16])
def test_draft_kernel_matches_the_reference(width):
    rng = random.Random(100 + width)
    for _ in range(12):
        tokens = _sources(rng)
        padded, state = _buffer(tokens, 150), _state(tokens[-1], len(tokens))
        want = _staged(draft_ref, padded, state, width)
        got = _staged(lambda *a: draft_triton(*a, block=32), padded, state, width)
        assert got == want


def _judge(fn, width, drafts, chosen, count=0, length=20):
    ids = torch.tensor([4, *drafts], dtype=torch.long, device=DEVICE)
    chosen = torch.tensor(chosen, dtype=torch.long, device=DEVICE)
    values = torch.linspace(1.0, 2.0, width, device=DEVICE)
    lse = torch.full((width,), 3.0, device=DEVICE)
    padded = _buffer(list(range(length)), 64)
    state = torch.tensor([4, 100, 40, count, length, 2], dtype=torch.long, device=DEVICE)
    kept = torch.zeros((2, 32), dtype=torch.float64, device=DEVICE)
    accepts = torch.zeros(4, dtype=torch.long, device=DEVICE)
    fn(chosen, values, lse, ids, padded, state, kept, accepts)
    return padded, state, kept, accepts


def test_accept_ref_keeps_agreeing_drafts_and_the_bonus():
    padded, state, kept, accepts = _judge(accept_ref, 4, [7, 8, 9], [7, 8, 5, 6], count=3)
    assert state.tolist() == [5, 103, 43, 6, 23, 3]  # two drafts and the bonus 5 kept
    assert kept[0, 3:6].tolist() == [7, 8, 5]
    assert kept[1, 3:6].tolist() == pytest.approx([-2.0, -2.0 + 1 / 3, -2.0 + 2 / 3])
    assert padded[MAX_MATCH + 20 : MAX_MATCH + 24].tolist() == [7, 8, 5, -1]
    assert accepts.tolist()[2] == 2
    _, state, kept, accepts = _judge(accept_ref, 4, [7, 8, 9], [7, 8, 9, 6])
    assert state.tolist()[:4] == [6, 104, 44, 4] and accepts.tolist()[2] == 3  # all drafts and the bonus
    _, state, kept, accepts = _judge(accept_ref, 4, [1, 8, 9], [7, 8, 9, 6])
    assert state.tolist()[:4] == [7, 101, 41, 1] and accepts.tolist()[2] == 0  # only the target's token


@needs_triton
@pytest.mark.parametrize("width", [2, 4, 8, 16])
def test_accept_kernel_matches_the_reference(width):
    rng = random.Random(width)
    for _ in range(10):
        chosen = [rng.randrange(3) for _ in range(width)]
        drafts = [c if rng.random() < 0.7 else 9 for c in chosen[:-1]]
        count = rng.randrange(20)
        want = _judge(accept_ref, width, drafts, chosen, count=count)
        got = _judge(accept_triton, width, drafts, chosen, count=count)
        (g_padded, g_state, g_kept, g_accepts), (w_padded, w_state, w_kept, w_accepts) = got, want
        # the last slot of the buffer and of `kept` takes the reference's writes that go nowhere
        assert torch.equal(g_padded[:-1], w_padded[:-1]) and torch.equal(g_kept[:, :-1], w_kept[:, :-1])
        assert torch.equal(g_state, w_state) and torch.equal(g_accepts, w_accepts)
