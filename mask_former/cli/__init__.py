"""Command-line programs of the package (installed as console scripts, see pyproject.toml).

``maskformer-train`` is :func:`mask_former.cli.train_net.main` and ``maskformer-demo``
:func:`mask_former.cli.demo.main`; ``python tools/train_net.py`` and ``python tools/demo.py`` run
the same code from a source checkout.
"""
