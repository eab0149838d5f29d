"""`runtime-manager`: puts the sidecar into ECS (task definitions, services, ECR, IAM, VPC endpoints, coverage)."""
