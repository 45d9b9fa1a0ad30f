"""``evaluate ... --lm-eval TASK,...``: lm-eval-harness's ``simple_evaluate`` on a language model in memory (a run at
a pruned setting, without exporting it), an optional dependency (``pip install varprune[eval]``).

:class:`VarpruneLM` is the lm-eval model: ``loglikelihood`` through the same scorer as ``--choices``
(tasks/choices.py, lm-eval's own request encoding, batched), ``loglikelihood_rolling`` over lm-eval's rolling
windows of the model's positions, ``generate_until`` by greedy decoding. :func:`lm_eval_results` runs the tasks
and reports each one's ``acc`` and ``acc_norm`` (``acc`` where a task has no ``acc_norm``) and its number of
questions, the form ``--choices`` reports in. The real tasks download their data from the Hugging Face Hub when
the user runs them; a folder of task YAMLs of one's own (``--lm-eval-include``) may point at local files.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from varprune.errors import RunError

GENERATE_TOKENS = 256  # lm-eval's default max_gen_toks


def lm_eval_problem(tasks: list[str], include: str | None = None) -> str | None:
    """Why ``--lm-eval tasks`` cannot run here (lm-eval missing, a bad include folder, a task lm-eval does not
    know), or None: checked before the model is loaded."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return "--lm-eval needs lm-eval-harness: `pip install 'varprune[eval]'` (or `pip install lm-eval`)"
    if include is not None and not Path(include).is_dir():
        return f"--lm-eval-include {include} is not a folder; give a folder of lm-eval task YAMLs"
    unknown = [t for t in tasks if t not in _manager(include).all_tasks]
    if unknown:
        return f"--lm-eval {', '.join(unknown)}: not an lm-eval task (`lm-eval ls tasks` lists them)"
    return None


@functools.lru_cache(maxsize=4)
def _manager(include: str | None):
    """lm-eval's task index (with ``include``'s YAMLs), built once: indexing takes seconds."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include) if include else TaskManager()


def _lm_class():
    from lm_eval.api.model import LM

    from varprune.engine.choices import prefix_token
    from varprune.tasks.choices import encode_pair, scored

    class VarpruneLM(LM):
        """An lm-eval model over a :class:`~varprune.engine.lmsource.LanguageModel`."""

        def __init__(self, lm):
            super().__init__()
            self.lm = lm
            self.prefix = prefix_token(lm.tokenizer)

        def _scored(self, pairs):
            return scored(self.lm.model, pairs, self.lm.positions, self.lm.device, self.lm.amp)

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            encode = self.lm.tokenizer.encode
            pairs = [encode_pair(encode, r.args[0], r.args[1], self.prefix) for r in requests]
            return list(zip(*self._scored(pairs))) if pairs else []

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            from lm_eval import utils

            if self.prefix is None:
                raise RunError("rolling log-likelihoods need a beginning-of-text token, which this tokenizer lacks")
            windows, owner = [], []
            for i, r in enumerate(requests):
                tokens = self.lm.tokenizer.encode(r.args[0])
                for w in utils.get_rolling_token_windows(tokens, self.prefix, self.lm.positions, 1):
                    windows.append(utils.make_disjoint_window(w))
                    owner.append(i)
            totals = [0.0] * len(requests)
            for i, value in zip(owner, self._scored(windows)[0] if windows else []):
                totals[i] += value
            return totals

        @torch.no_grad()
        def generate_until(self, requests, disable_tqdm: bool = False):
            from varprune.tasks.text import logits_of

            model, tok, out = self.lm.model, self.lm.tokenizer, []
            model.eval()
            for r in requests:
                context, kwargs = r.args[0], dict(r.args[1]) if len(r.args) > 1 else {}
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                ids = tok.encode(context) or ([self.prefix] if self.prefix is not None else [])
                new: list[int] = []
                text = ""
                for _ in range(int(kwargs.get("max_gen_toks", GENERATE_TOKENS))):
                    window = (ids + new)[-self.lm.positions :]
                    logits = logits_of(model(torch.tensor([window], device=self.lm.device)))
                    new.append(int(logits[0, -1].argmax()))
                    text = tok.decode(new)
                    if any(u in text for u in until):
                        break
                for u in until:
                    text = text.split(u)[0]
                out.append(text)
            return out

    return VarpruneLM


def lm_eval_results(lm, tasks: list[str], limit: int | None = None, include: str | None = None) -> dict:
    """lm-eval's ``simple_evaluate`` of ``lm`` (a LanguageModel, engine/lmsource.py) on ``tasks``:
    ``{"tasks": {name: {"acc", "acc_norm", "n"}}}``; an unknown task is a RunError naming it."""
    from lm_eval import simple_evaluate

    problem = lm_eval_problem(tasks, include)
    if problem:
        raise RunError(problem)
    manager = _manager(include)
    found = simple_evaluate(
        model=_lm_class()(lm),
        tasks=list(tasks),
        limit=limit,
        task_manager=manager,
        bootstrap_iters=0,
        log_samples=False,
    )
    if found is None:
        raise RunError("lm-eval returned no results")
    out: dict = {"tasks": {}}
    for name, values in found["results"].items():
        acc = values.get("acc,none")
        if acc is None:
            continue  # a group's own row, or a task measuring no accuracy
        n = found.get("n-samples", {}).get(name, {}).get("effective")
        out["tasks"][name] = {"acc": acc, "acc_norm": values.get("acc_norm,none", acc), "n": n}
    if not out["tasks"]:
        raise RunError(f"--lm-eval {','.join(tasks)}: no task reported an accuracy (acc)")
    return out
