//! Typed access for callers that keep JSON documents in the store: read with the revision, and
//! read-modify-write loops that retry on compare-and-swap conflicts.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{Precondition, ReadStore, Revision, Store, StoreError};

/// A decoded value and the modification revision it was read at (for compare-and-swap).
#[derive(Clone, Debug)]
pub struct Versioned<T> {
    pub value: T,
    pub revision: Revision,
}

pub async fn get_json<T: DeserializeOwned>(
    store: &dyn ReadStore,
    key: &str,
) -> Result<Option<Versioned<T>>, StoreError> {
    match store.get(key).await? {
        Some(kv) => Ok(Some(Versioned {
            value: serde_json::from_slice(&kv.value)?,
            revision: kv.mod_revision,
        })),
        None => Ok(None),
    }
}

pub async fn list_json<T: DeserializeOwned>(
    store: &dyn ReadStore,
    prefix: &str,
) -> Result<(Vec<T>, Revision), StoreError> {
    let (kvs, rev) = store.list(prefix).await?;
    let items = kvs
        .iter()
        .map(|kv| serde_json::from_slice(&kv.value))
        .collect::<Result<_, _>>()?;
    Ok((items, rev))
}

/// Applies `change` to the current value and writes it back with compare-and-swap, retrying when
/// someone else wrote in between. `change` returns `Ok(false)` to leave the value as it is.
/// Returns the value as written (or as found), or `None` if the key does not exist.
pub async fn update_json<T, E>(
    store: &dyn Store,
    key: &str,
    mut change: impl FnMut(&mut T) -> Result<bool, E>,
) -> Result<Option<T>, E>
where
    T: Serialize + DeserializeOwned,
    E: From<StoreError>,
{
    loop {
        let Some(Versioned {
            mut value,
            revision,
        }) = get_json::<T>(store, key).await?
        else {
            return Ok(None);
        };
        if !change(&mut value)? {
            return Ok(Some(value));
        }
        let bytes = serde_json::to_vec(&value).map_err(StoreError::from)?;
        match store
            .put(key, bytes, Precondition::ModRevision(revision))
            .await
        {
            Ok(_) => return Ok(Some(value)),
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}
