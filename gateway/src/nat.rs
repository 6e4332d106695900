//! Optional masquerading (`--nat`) with an nftables table of the gateway's own.
//!
//! The gateway owns `table ip webnic_<tun>` (and `table ip6 webnic_<tun>` with IPv6): it deletes
//! them at start (a previous run may have crashed), creates them, and deletes them on exit.
//! Nothing else in the ruleset is touched.

use crate::pool::Cidr;
use crate::sys::{self, CommandError};

/// The installed NAT tables; removed on drop.
#[derive(Debug)]
pub struct Nat {
    tables: Vec<(&'static str, String)>,
}

impl Nat {
    /// Installs masquerading for traffic from `pools` leaving through any interface but `tun`.
    ///
    /// # Errors
    /// [`CommandError`] if `nft` is missing or refuses the ruleset.
    pub fn install(tun: &str, pools: &[Cidr]) -> Result<Self, CommandError> {
        let table = table_name(tun);
        let mut nat = Self { tables: Vec::new() };
        for pool in pools {
            let family = if pool.network.is_ipv4() { "ip" } else { "ip6" };
            delete_table(family, &table);
            let ruleset = ruleset(family, &table, tun, pool);
            sys::run("nft", &["-f", "-"], Some(&ruleset))?;
            tracing::info!(%pool, family, %table, "installed nftables masquerade");
            nat.tables.push((family, table.clone()));
        }
        Ok(nat)
    }

    /// Removes the tables (also done on drop).
    pub fn remove(&mut self) {
        for (family, table) in self.tables.drain(..) {
            match sys::run("nft", &["delete", "table", family, &table], None) {
                Ok(()) => tracing::info!(family, %table, "removed nftables table"),
                Err(error) => tracing::warn!(%error, "cannot remove nftables table"),
            }
        }
    }
}

impl Drop for Nat {
    fn drop(&mut self) {
        self.remove();
    }
}

fn table_name(tun: &str) -> String {
    format!("webnic_{}", tun.replace('-', "_"))
}

fn delete_table(family: &str, table: &str) {
    // Fails when the table does not exist, which is the normal case.
    let _ = sys::run("nft", &["delete", "table", family, table], None);
}

fn ruleset(family: &str, table: &str, tun: &str, pool: &Cidr) -> String {
    format!(
        "table {family} {table} {{\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\t{family} saddr {pool} oifname != \"{tun}\" masquerade\n\
         \t}}\n\
         }}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ruleset_text() {
        let pool: Cidr = "10.77.0.0/24".parse().unwrap();
        let text = ruleset("ip", &table_name("wn-0"), "wn-0", &pool);
        assert!(text.starts_with("table ip webnic_wn_0 {\n"));
        assert!(text.contains("ip saddr 10.77.0.0/24 oifname != \"wn-0\" masquerade"));
        let pool6: Cidr = "fd00:77::/112".parse().unwrap();
        assert!(ruleset("ip6", "t", "x", &pool6).contains("ip6 saddr fd00:77::/112"));
    }
}
