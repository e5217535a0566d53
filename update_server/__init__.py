"""The edgepack update server: bundle registry, TUF image repository, director, devices, phased rollouts.

Layout (see docs/server.md): ``settings`` (one Settings object built in the app factory), ``models``
(SQLAlchemy 2 typed ORM, Alembic migrations in ``migrations/``), ``services/`` (transactions and domain
errors), ``api/`` (thin FastAPI routers), ``rollout_policy`` (the pure rollout decision), ``ingest`` (MQTT
telemetry), ``app`` (factory and background loops), ``cli`` (``edgepack-server``) and ``admin_cli``
(``edgepack bundles|devices|rollout`` over the HTTP API).
"""
