"""Training MEND's hypernetwork (edit/mend_net.py) on edit requests (docs/METHODS.md "MEND").

One example: `edits_per_example` requests are edited with the current network (their gradient factors on the
unedited model, the update W' = W + eta * sum delta~ u~^T built in the graph), then

    L = c_edit * NLL(new target | a paraphrase of the prompt; W')  +  c_loc * KL(p(. | loc; W) || p(. | loc; W'))

where loc are (prompt, answer) pairs of other facts (the requests' neighbourhood prompts, else other requests'
prompts with their true targets), the KL taken at their answer positions. `accumulate` examples make one
Adam step of the network (lr) and of the step sizes eta (lr_lr); the network's gradient norm is clipped. The
normalisation statistics are updated with every example's gradient rows before it is transformed.

Original code: eric-mitchell/mend, `trainer.py` (`EditTrainer.edit_step`: the edit on `edit_inner`, the
edit loss on `edit_outer` (the rephrase), `kl_loc_loss` on `loc`, `cedit`/`cloc`, `safe_backward` over
`accumulate_bs`, the separate `lr_opt` for `edit_lrs`), `losses.py` (`kl_loc_loss`, `masked_log_probs`).
Differences: no validation-based early stopping (a fixed number of steps; `validation` requests are held
back and measured once at the end); loc pairs come from the training requests instead of Natural Questions.
"""

from __future__ import annotations

import logging
import random
import time

import torch
from tqdm.auto import tqdm

from editdecay.core.errors import DataError
from editdecay.core.request import EditRequest
from editdecay.edit.losses import model_device, target_batch, target_log_probs, target_nll
from editdecay.edit.mend_net import Hypernetwork, edited_weights, gradient_factors

log = logging.getLogger(__name__)


def _loc_pairs(requests: list[EditRequest]) -> list[tuple[str, str]]:
    """Unrelated (prompt, answer) pairs: the requests' neighbourhood facts, else their own true facts."""
    pairs = [(p, a) for r in requests for p, a in zip(r.neighborhood_prompts, r.neighborhood_answers)]
    if not pairs:
        pairs = [(r.rewrite_prompt, r.target_true) for r in requests if r.target_true]
    return list(dict.fromkeys(pairs))


def kl_base_edited(base_lp: torch.Tensor, edited_lp: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(base || edited) from log-probabilities (G, V) (mend losses.py `kl_loc_loss`)."""
    return (base_lp.exp() * (base_lp - edited_lp)).sum(-1).mean()


def train_hypernetwork(lm, cfg, settings, requests: list[EditRequest], *,
                       progress: bool = True) -> tuple[Hypernetwork, dict, list[EditRequest]]:
    """Train a network for `cfg.layers`/`cfg.modules` (a MendConfig) of `lm.model` on `requests` with `settings`
    (MendTraining); returns (network, its record, the held-back requests), which `Mend.train` (edit/mend.py)
    measures and saves. Raises DataError when there are too few requests (validation + edits_per_example + 1)."""
    s = settings
    rng = random.Random(s.seed)
    requests = list(requests)
    if len(requests) < s.validation + s.edits_per_example + 1:
        raise DataError(f"MEND training needs more than validation + edits_per_example = "
                        f"{s.validation + s.edits_per_example} requests; got {len(requests)}")
    order = requests[:]
    rng.shuffle(order)
    held, train = order[:s.validation], order[s.validation:]
    loc = _loc_pairs(train)
    if len(loc) < s.loc_per_example:
        raise DataError(f"MEND training: {len(loc)} locality pairs, fewer than loc_per_example={s.loc_per_example}")
    model, tok = lm.model, lm.tokenizer
    device = model_device(model)
    weights = edited_weights(model, cfg.layers, cfg.modules)
    names = list(weights)
    net = Hypernetwork(weights, rank=s.rank, n_hidden=s.n_hidden, edit_lr=s.edit_lr, seed=s.seed).to(device)
    net.train()
    opt = torch.optim.Adam(list(net.transforms.parameters()), lr=s.lr)
    lr_opt = torch.optim.Adam([net.edit_lrs], lr=s.lr_lr)
    history, window, started = [], [], time.time()
    bar = tqdm(range(s.steps), desc="MEND training", disable=not progress)
    for step in bar:
        for _ in range(s.accumulate):
            edits = rng.sample(train, s.edits_per_example)
            inner = target_batch(tok, [(r.rewrite_prompt, r.target_new) for r in edits], device)
            outer = target_batch(tok, [(rng.choice(r.paraphrase_prompts) if r.paraphrase_prompts else r.rewrite_prompt,
                                        r.target_new) for r in edits], device)
            locb = target_batch(tok, rng.sample(loc, s.loc_per_example), device)
            with torch.no_grad():
                base_lp = target_log_probs(model, locb)
            inner_loss, factors = gradient_factors(model, names, inner)
            params = {f"{n}.weight": _weight(model, n).detach() + net.update(n, u, v, observe=True)
                      for n, (u, v) in factors.items()}
            l_edit = target_nll(model, outer, params).mean()
            l_loc = kl_base_edited(base_lp, target_log_probs(model, locb, params))
            loss = s.c_edit * l_edit + s.c_loc * l_loc
            (loss / s.accumulate).backward()
            window.append((float(inner_loss), float(l_edit.detach()), float(l_loc.detach())))
        torch.nn.utils.clip_grad_norm_(net.transforms.parameters(), s.grad_clip)
        opt.step()
        lr_opt.step()
        opt.zero_grad(set_to_none=True)
        lr_opt.zero_grad(set_to_none=True)
        if (step + 1) % s.log_every == 0 or step + 1 == s.steps:
            mean = [sum(x) / len(window) for x in zip(*window)]
            point = {"step": step + 1, "inner_nll": mean[0], "edit_nll": mean[1], "loc_kl": mean[2],
                     "seconds": round(time.time() - started, 1)}
            history.append(point)
            log.info("MEND step %d: NLL before edit %.3f, after %.3f, locality KL %.4f", step + 1, *mean)
            bar.set_postfix(edit=f"{mean[1]:.2f}", kl=f"{mean[2]:.3f}")
            window = []
    seconds = time.time() - started
    net.eval()
    record = {
        "model": lm.identity.to_dict(), "layers": list(cfg.layers), "modules": cfg.modules,
        "training": {"settings": settings.to_dict(), "n_requests": len(train), "seconds": round(seconds, 1),
                     "case_ids": [r.case_id for r in train], "subjects": sorted({r.subject for r in train}),
                     "validation_case_ids": [r.case_id for r in held], "history": history,
                     "data": sorted({r.source for r in train})},
    }
    return net, record, held


def _weight(model, name: str) -> torch.Tensor:
    from editdecay.core.arch import get_module

    return get_module(model, name).weight


__all__ = ["kl_base_edited", "train_hypernetwork"]
