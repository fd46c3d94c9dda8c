"""attend's Triton kernels and their launchers: ``core`` (the ``tl`` forward and backward),
``ws`` / ``ws_bwd`` (the warp-specialized Gluon kernels, sm_90) with ``ws_common``, ``launch``
(allocate, plan, launch), ``configs`` (the fixed configs' rule list), ``options`` (per-call tuning
choices), ``fastlaunch``, ``worklist`` and ``build`` (ahead-of-time builds). Importing the
package imports none of them: ``options`` must load without Triton."""
