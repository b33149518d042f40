"""
imml-mac: run Immich's machine-learning service natively on a Mac, set up,
checked and supervised (``twistd -n imml-mac``; see docs/mac.md).

Modules: :mod:`~imml.mac.tap` (options, commands, the service tree),
:mod:`~imml.mac.supervisor` (the child's life cycle and restarts), with
:mod:`~imml.mac.process_group` (the child's process group),
:mod:`~imml.mac.child_protocol` (its output and end) and
:mod:`~imml.mac.health_watch` (when to probe it), :mod:`~imml.mac.readiness`
(``/ping``), :mod:`~imml.mac.preflight` and :mod:`~imml.mac.doctor` (what
the Immich interpreter can do, judged from :mod:`~imml.mac.probe_script`
run by :mod:`~imml.mac.interpreter`), :mod:`~imml.mac.providers` (the
child's environment and provider hook), :mod:`~imml.mac.sleep`
(caffeinate), :mod:`~imml.mac.install` (``setup``) and
:mod:`~imml.mac.launchagent`.
"""
