"""optuna-dashboard on the Optuna storage named by SWEEPER_STORAGE, served by gunicorn.

The storage URL holds the PostgreSQL password, so it is read from the environment here and
never passed as an argument (`optuna-dashboard URL` would show it to every `ps` on the host).
Optuna's tables are created first (idempotent): optuna-dashboard opens the storage with
skip_table_creation=True and would fail on a database no worker has touched yet.
"""

import os
import sys

url = os.environ.get("SWEEPER_STORAGE", "")
if not url:
    sys.exit("optuna-dashboard: set SWEEPER_STORAGE to the Optuna storage URL")

import optuna  # noqa: E402
import optuna_dashboard  # noqa: E402
from gunicorn.app.base import BaseApplication  # noqa: E402

storage = optuna.storages.RDBStorage(url, skip_compatibility_check=True)
app = optuna_dashboard.wsgi(storage)


class Dashboard(BaseApplication):
    def load_config(self):
        self.cfg.set("bind", os.environ.get("DASHBOARD_BIND", "0.0.0.0:8080"))
        self.cfg.set("threads", 4)

    def load(self):
        return app


Dashboard().run()
