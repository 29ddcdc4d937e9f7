-- One PostgreSQL server, one database per service.
CREATE DATABASE mlflow;
CREATE DATABASE prefect;
