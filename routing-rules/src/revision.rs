//! Revisions of rules documents kept in files (the embedded mode): the
//! revision is a property of the document — its top-level `revision` key,
//! which `cellctl rules bump` raises — never of the file (mtimes differ
//! between machines, and a `cp -p` can go backwards). Every process that
//! reads the same text therefore runs the same revision, and a cell can
//! tell a request stamped with newer rules from one stamped with older.
//!
//! A document without the key has revision 0 ("unversioned"): its changes
//! still apply, but nobody can order them. (In etcd, etcd numbers the
//! revisions and the key is ignored.)

use crate::error::RulesError;
use crate::model::Rules;

/// Largest revision a document may carry (2^53 − 1, exact in JSON).
pub const MAX_REVISION: u64 = (1 << 53) - 1;

/// Why a changed document may not replace the current one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RevisionError {
    /// The document is invalid.
    #[error("{0}")]
    Invalid(#[from] RulesError),
    /// The new document's revision is lower than the one being served.
    #[error("revision went backwards: {current} is being served, the document says {next}")]
    Backwards {
        /// Served revision.
        current: u64,
        /// Document's revision.
        next: u64,
    },
    /// The text changed but the revision did not.
    #[error("the document changed but its revision is still {revision}; raise it (cellctl rules bump FILE)")]
    NotBumped {
        /// The unchanged revision.
        revision: u64,
    },
    /// A versioned document was replaced by one without a revision.
    #[error("the document lost its revision key ({current} is being served); put `revision = {}` back", current + 1)]
    Dropped {
        /// Served revision.
        current: u64,
    },
}

/// A parsed document and the revision it carries (0 = unversioned).
#[derive(Debug, Clone)]
pub struct Versioned {
    /// The rules.
    pub rules: Rules,
    /// The `revision` key, or 0.
    pub revision: u64,
}

/// Parses `text` and checks that it may replace the document being served
/// (`current`: its revision and text; `None` at start). Unchanged text is
/// not a reload and is the caller's to skip.
pub fn next_document(current: Option<(u64, &str)>, text: &str) -> Result<Versioned, RevisionError> {
    let (rules, revision) = crate::validate::parse_versioned(text)?;
    let revision = revision.unwrap_or(0);
    if let Some((served, served_text)) = current {
        if served_text != text {
            if revision == 0 && served > 0 {
                return Err(RevisionError::Dropped { current: served });
            }
            if revision > 0 && revision < served {
                return Err(RevisionError::Backwards {
                    current: served,
                    next: revision,
                });
            }
            if revision > 0 && revision == served {
                return Err(RevisionError::NotBumped { revision });
            }
        }
    }
    Ok(Versioned { rules, revision })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str =
        "slots = 2\n[cells.a]\nblue = [\"h:1\"]\n[[ranges]]\nfrom = 0\nto = 1\ncell = \"a\"\n";

    fn with(rev: u64, extra: &str) -> String {
        format!("revision = {rev}\n{DOC}{extra}")
    }

    #[test]
    fn the_revision_is_the_documents_and_only_moves_forward() {
        assert_eq!(next_document(None, DOC).unwrap().revision, 0);
        let v1 = with(1, "");
        assert_eq!(next_document(None, &v1).unwrap().revision, 1);
        let v2 = with(2, "# a comment\n");
        assert_eq!(next_document(Some((1, &v1)), &v2).unwrap().revision, 2);
        assert_eq!(
            next_document(Some((2, &v2)), &with(2, "# edited\n")).unwrap_err(),
            RevisionError::NotBumped { revision: 2 }
        );
        assert_eq!(
            next_document(Some((2, &v2)), &v1).unwrap_err(),
            RevisionError::Backwards {
                current: 2,
                next: 1
            }
        );
        assert_eq!(
            next_document(Some((2, &v2)), DOC).unwrap_err(),
            RevisionError::Dropped { current: 2 }
        );
        // Unversioned documents still change (revision 0), and the same
        // text is never refused.
        assert_eq!(
            next_document(Some((0, DOC)), &format!("{DOC}# x\n"))
                .unwrap()
                .revision,
            0
        );
        assert!(next_document(Some((2, &v2)), &v2).is_ok());
    }

    #[test]
    fn out_of_range_revisions_are_refused() {
        for bad in ["0", "-1", "9007199254740992"] {
            let e = next_document(None, &format!("revision = {bad}\n{DOC}")).unwrap_err();
            assert!(e.to_string().contains("revision"), "{bad}: {e}");
        }
    }
}
