#!/bin/sh
# The stack's databases, as `visionops stack up` names them (visionops/ops/stack.py,
# DATABASES), each owned by the one service that uses it: MLflow's role owns its tracking
# store and its basic-auth users, Prefect's role the server's. No other role may connect
# to them (CONNECT and TEMPORARY are revoked from PUBLIC), and neither role is a superuser
# or may create databases or roles. The postgres image runs this once, when its data
# volume is first initialised, with the passwords from the container's environment
# (psql quotes them: :'name').
: "${VISIONOPS_POSTGRES_MLFLOW_PASSWORD:?}" "${VISIONOPS_POSTGRES_PREFECT_PASSWORD:?}"
psql -v ON_ERROR_STOP=1 --no-psqlrc --username "${POSTGRES_USER:-postgres}" \
  --dbname "${POSTGRES_DB:-postgres}" \
  --set mlflow_password="$VISIONOPS_POSTGRES_MLFLOW_PASSWORD" \
  --set prefect_password="$VISIONOPS_POSTGRES_PREFECT_PASSWORD" <<'SQL'
CREATE ROLE visionops_mlflow LOGIN PASSWORD :'mlflow_password';
CREATE ROLE visionops_prefect LOGIN PASSWORD :'prefect_password';
CREATE DATABASE visionops_mlflow OWNER visionops_mlflow;
CREATE DATABASE visionops_mlflow_auth OWNER visionops_mlflow;
CREATE DATABASE visionops_prefect OWNER visionops_prefect;
REVOKE ALL ON DATABASE visionops_mlflow, visionops_mlflow_auth, visionops_prefect FROM PUBLIC;
REVOKE CONNECT ON DATABASE postgres FROM PUBLIC;
SQL
