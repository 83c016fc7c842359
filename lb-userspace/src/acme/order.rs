//! One ACME order (RFC 8555): an account (kept in the store, so that every node and every
//! restart uses the same one), the HTTP-01 challenge of each name answered through the
//! store, then the certificate and its fresh key.
use std::{sync::Arc, time::Duration};

use anyhow::{Context, bail};
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use serde::{Deserialize, Serialize};

use super::{AcmeConfig, challenges};
use crate::store::{Expect, Store};

const ACCOUNT: &str = "account";

/// The stored account: the directory it belongs to, and its credentials (key included).
#[derive(Serialize, Deserialize)]
struct StoredAccount {
    directory: String,
    credentials: AccountCredentials,
}

fn builder(config: &AcmeConfig) -> anyhow::Result<instant_acme::AccountBuilder> {
    Ok(match &config.ca_file {
        Some(path) => Account::builder_with_root(path)
            .with_context(|| format!("--acme-ca-file {}", path.display()))?,
        None => Account::builder()?,
    })
}

/// The group's account at the configured directory: the stored one, or a new one (stored).
pub async fn account(config: &AcmeConfig, store: &Arc<dyn Store>) -> anyhow::Result<Account> {
    let listing = store.list().await?;
    if let Some(entry) = listing.entries.iter().find(|e| e.name == ACCOUNT)
        && let Ok(stored) = serde_json::from_slice::<StoredAccount>(&entry.value)
        && stored.directory == config.directory
    {
        return Ok(builder(config)?
            .from_credentials(stored.credentials)
            .await?);
    }
    let contact = config.email.as_ref().map(|e| format!("mailto:{e}"));
    let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
    let (account, credentials) = builder(config)?
        .create(
            &NewAccount {
                contact: &contacts,
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            config.directory.clone(),
            None,
        )
        .await
        .with_context(|| format!("creating an account at {}", config.directory))?;
    let stored = StoredAccount {
        directory: config.directory.clone(),
        credentials,
    };
    let value = serde_json::to_vec(&stored)?;
    store.put(ACCOUNT, &value, Expect::Any).await?;
    tracing::info!(directory = %config.directory, "ACME account created and stored");
    Ok(account)
}

/// A certificate for `domain`: its chain and key, as PEM. The challenges it wrote to the
/// store are removed whatever the outcome.
pub async fn order(
    account: &Account,
    domain: &str,
    store: &Arc<dyn Store>,
    seen: &challenges::Challenges,
) -> anyhow::Result<(String, String)> {
    let mut tokens = Vec::new();
    let result = order_answering(account, domain, store, seen, &mut tokens).await;
    for token in tokens {
        if let Err(e) = store
            .delete(&challenges::entry_name(&token), Expect::Any)
            .await
        {
            tracing::warn!(error = %e, "removing an answered ACME challenge from the store");
        }
    }
    result
}

async fn order_answering(
    account: &Account,
    domain: &str,
    store: &Arc<dyn Store>,
    seen: &challenges::Challenges,
    tokens: &mut Vec<String>,
) -> anyhow::Result<(String, String)> {
    let identifiers = [Identifier::Dns(domain.to_string())];
    let mut order = account.new_order(&NewOrder::new(&identifiers)).await?;
    let mut authorizations = order.authorizations();
    while let Some(authorization) = authorizations.next().await {
        let mut authorization = authorization?;
        match authorization.status {
            AuthorizationStatus::Pending => {}
            AuthorizationStatus::Valid => continue,
            other => bail!("the CA's authorization for {domain} is {other:?}"),
        }
        let mut challenge = authorization
            .challenge(ChallengeType::Http01)
            .with_context(|| format!("the CA offers no HTTP-01 challenge for {domain}"))?;
        let token = challenge.token.clone();
        let answer = challenge.key_authorization();
        store
            .put(
                &challenges::entry_name(&token),
                answer.as_str().as_bytes(),
                Expect::Any,
            )
            .await?;
        tokens.push(token.clone());
        wait_until_answered(seen, &token).await;
        challenge.set_ready().await?;
    }
    let patient = RetryPolicy::new()
        .initial_delay(Duration::from_millis(250))
        .timeout(Duration::from_secs(90));
    match order.poll_ready(&patient).await? {
        OrderStatus::Ready => {}
        other => bail!("the CA did not validate {domain}: order {other:?}"),
    }
    let key = order.finalize().await?;
    let chain = order.poll_certificate(&patient).await?;
    Ok((chain, key))
}

/// Waits until this node answers `token` (the store has delivered it), then a moment more
/// for the other nodes, which follow the same store.
async fn wait_until_answered(seen: &challenges::Challenges, token: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !seen.has(token) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
}
