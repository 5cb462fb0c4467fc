"""TucDesk audit: signed records, per-team hash-chained Merkle logs, checkpoints, export bundles,
and the offline verifier behind ``tucdesk-audit verify``.

Modules, one concern each:

* ``actions``    the fixed vocabulary (actions, actor kinds, policy outcomes)
* ``record``     record and event fields, limits, RFC 8785 encoding, signing, strict parsing
* ``trust``      which keys may sign: pinned audit keys, and agent keys they introduce
* ``merkle``     RFC 6962/9162 hashing, frontier, inclusion and consistency proofs
* ``note``       C2SP signed notes; ``checkpoint`` C2SP tlog-checkpoints
* ``store``      the async storage interface (SQLite/PostgreSQL live in rendezvous/) and a
  memory store
* ``log``        AuditLog: append, checkpoint, proofs, streaming export
* ``bundle``     the export file format; ``verify`` the offline verifier; ``main`` the CLI
* ``agent_pins`` agent fingerprints an auditor pins out of band (``--agent-key``)
* ``show``       the records of a verified bundle for people; ``terminal_text`` escapes them

Design decisions are written down in audit/README.md.
"""
