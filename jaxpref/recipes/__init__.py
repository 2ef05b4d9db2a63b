"""Recipes: run configs and the runners that assemble a run from the library's layers.

- :mod:`~jaxpref.recipes.configs`: plain frozen dataclasses, every default in one place (the
  online algorithms' sections are :mod:`jaxpref.train.online`'s algorithms themselves).
- :mod:`~jaxpref.recipes.objectives`: the objectives each kind of run trains.
- :mod:`~jaxpref.recipes.common`: mesh, tokenizer, policy, optimizer, the loop with its run folder,
  sampling.
- One module per kind of run: :mod:`~jaxpref.recipes.offline` (``jaxpref sft|dpo|kto``),
  :mod:`~jaxpref.recipes.online` (``grpo|rloo|online-dpo|ppo``), :mod:`~jaxpref.recipes.reward`
  and :mod:`~jaxpref.recipes.reward_eval` (``reward``, ``reward-eval``),
  :mod:`~jaxpref.recipes.diffusion` (``diffusion`` and its methods) and
  :mod:`~jaxpref.recipes.demo` (``jaxpref demo``, ``make demo``).

Bundled assets (``assets/``): the character tokenizer of the sorting and cyclic tasks, and a
RewardBench-layout example file.
"""
