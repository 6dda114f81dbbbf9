# The MLflow tracking server with its basic-auth app (Flask-WTF: `mlflow[auth]`), the version the
# project's clients use (pyproject.toml) and the tests run against.
FROM python:3.11.11-slim
RUN pip install --no-cache-dir "mlflow[auth]==3.17.2"
COPY docker/mlflow-auth.ini /etc/mlflow/basic_auth.ini
ENV MLFLOW_AUTH_CONFIG_PATH=/etc/mlflow/basic_auth.ini
# a named volume at /data starts with this folder's owner: the server runs as nobody, not root
RUN mkdir /data && chown nobody /data
USER nobody
