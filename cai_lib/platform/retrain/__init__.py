"""GitOps retraining: the identity of a change (`identity`), the ledger of attempts (`ledger`),
the decision of what to submit (`policy`), and the loop over a git checkout that publishes and
submits (`gitops`)."""
