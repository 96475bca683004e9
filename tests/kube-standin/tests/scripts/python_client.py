"""Drives the kube-standin with the official Kubernetes Python client (PyPI `kubernetes`).

Usage: python_client.py ADMIN_KUBECONFIG REVIEWER_KUBECONFIG NAMESPACE SERVICE_ACCOUNT
Creates a TokenRequest through the admin kubeconfig, reviews the token through the
reviewer kubeconfig (user.tokenFile), and prints one JSON object with what it saw.
"""
import json
import sys

from kubernetes import client, config
from kubernetes.client.rest import ApiException

admin_kc, reviewer_kc, ns, sa = sys.argv[1:5]

admin = config.new_client_from_config(config_file=admin_kc)
core = client.CoreV1Api(admin)
tr = core.create_namespaced_service_account_token(
    sa,
    ns,
    client.AuthenticationV1TokenRequest(
        spec=client.V1TokenRequestSpec(audiences=["vault"], expiration_seconds=3600)
    ),
)
token = tr.status.token

reviewer = config.new_client_from_config(config_file=reviewer_kc)
auth = client.AuthenticationV1Api(reviewer)
ok = auth.create_token_review(
    client.V1TokenReview(spec=client.V1TokenReviewSpec(token=token, audiences=["vault"]))
)
rejected = auth.create_token_review(
    client.V1TokenReview(spec=client.V1TokenReviewSpec(token=token, audiences=["other"]))
)


def review_as(bearer):
    """Reviews `token` with `bearer` as the caller; returns the HTTP error, if any."""
    cfg = client.Configuration()
    cfg.host = admin.configuration.host
    cfg.ssl_ca_cert = admin.configuration.ssl_ca_cert
    cfg.api_key = {"authorization": "Bearer " + bearer}
    try:
        client.AuthenticationV1Api(client.ApiClient(cfg)).create_token_review(
            client.V1TokenReview(spec=client.V1TokenReviewSpec(token=token))
        )
    except ApiException as e:
        return {"status": e.status, "body": json.loads(e.body)}
    return None


# A token for the API audiences is a valid credential, but its service account is not
# bound to system:auth-delegator: 403. The "vault" token is no credential at all: 401.
api_token = core.create_namespaced_service_account_token(
    sa, ns, client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(audiences=[]))
).status.token
forbidden = review_as(api_token)
unauthorized = review_as(token)

print(
    json.dumps(
        {
            "token_request": {
                "audiences": tr.spec.audiences,
                "expiration_seconds": tr.spec.expiration_seconds,
                "token": token,
                "expiration_timestamp": tr.status.expiration_timestamp.isoformat(),
            },
            "review": admin.sanitize_for_serialization(ok.status),
            "rejected": admin.sanitize_for_serialization(rejected.status),
            "forbidden": forbidden,
            "unauthorized": unauthorized,
        }
    )
)
