"""The embedded benchmark (``starmerge demo``): a recipe on top of the eval harness and the API.

Trains a small zoo of LoRA adapters on real offline data with a real small model (cached), merges
them with every registered method through :mod:`starmerge.api`, scores each merge with
:mod:`starmerge.eval` and writes tables, plots and the HTML report with :mod:`starmerge.report`.
Nothing in ``starmerge.eval`` imports this package.

Modules: ``run`` (presets, entry point, sweeps), ``bench`` (the loop over methods), ``train``
(adapters), ``statistics`` and ``masks`` (data-driven rows), ``encoder`` (MiniLM tier),
``decoder``/``decoder_tasks``/``gemma`` (Gemma-3-270M tier), ``assets`` (PyPI data), ``env``.
"""
