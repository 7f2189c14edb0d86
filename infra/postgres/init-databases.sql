-- The stack's databases, as `visionops stack up` creates them (visionops/ops/stack.py,
-- DATABASES): MLflow's tracking store, MLflow's basic-auth users, Prefect's server.
-- The postgres image runs this once, when its data volume is first initialised.
CREATE DATABASE visionops_mlflow;
CREATE DATABASE visionops_mlflow_auth;
CREATE DATABASE visionops_prefect;
